"""The one result type: :class:`Explanation`, and :class:`ExplanationSet` for one call's many results.

An :class:`Explanation` holds one method at one layer for a batch of images and one or more targets per
image. Raw maps (signed, at layer resolution, before any ReLU) and the displayed maps (ReLU if the method
uses it, upsampled to the input, min-max normalised per map) are kept apart. ``degenerate`` flags maps that
were constant or all zero and were returned as zeros.

Volumes: for a ``Conv3d`` network explained on inputs ``(B, C, D, H, W)``, raw maps are ``(B, T, d, h, w)``
and maps ``(B, T, D, H, W)`` (:attr:`Explanation.is_volume`). ``save()`` then writes the full arrays (the raw
``.raw.npy`` and the upsampled, normalised ``.map.npy``) and draws the overlay and heatmap PNGs of the
middle depth slice ``D // 2`` (recorded as ``depth_slice`` in the manifest); ``images`` holds that slice of
the input. Consumers of 2-D maps (metrics, figures) call :meth:`Explanation.require_images`, which refuses a
volume with a message saying how to take a slice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch

from cnnlens.display import SPARSE_CMAP, method_traits, variant_options
from cnnlens.errors import InputShapeError, LayerNotFoundError, MethodNotFoundError
from cnnlens.explain_folder import ExplainFolder, _png_text, environment_versions, write_manifest
from cnnlens.imaging import clip_percentile, colorize, overlay, overlay_weighted, save_png
from cnnlens.notebook import DISPLAY_LIMIT, draw_tiles, explanations_html, show_tiles
from cnnlens.outputs_dir import safe_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ExplainFolder", "Explanation", "ExplanationSet", "environment_versions", "write_manifest"]


def _slug(text: str) -> str:
    """A file-name-safe, readable version of a layer, class or image name (unicode letters kept)."""
    return safe_name(text)


def _image_keys(names: Sequence[str], count: int) -> list[tuple[str, str]]:
    """Per image: ``(name, folder)``, each folder distinct (case-insensitively) within the set.

    A name whose safe form clashes with another's gets its position appended (``cat-2``), and that folder
    name becomes its name too, so the manifest points each image at its own files.
    """
    given = [names[b] if b < len(names) else f"image{b:04d}" for b in range(count)]
    folders = [safe_name(n, spaces=True) for n in given]
    clashes: dict[str, int] = {}
    for f in folders:
        clashes[f.casefold()] = clashes.get(f.casefold(), 0) + 1
    used = {f.casefold() for f in folders if clashes[f.casefold()] == 1}
    out: list[tuple[str, str]] = []
    for b, (name, folder) in enumerate(zip(given, folders, strict=True)):
        if clashes[folder.casefold()] == 1:
            out.append((name, folder))
            continue
        n = b + 1
        while f"{folder}-{n}".casefold() in used:
            n += 1
        unique = f"{folder}-{n}"
        used.add(unique.casefold())
        out.append((unique, unique))
    return out


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else "(" + ", ".join(str(int(d)) for d in t.shape) + ")"


def _degenerate_count(e: Explanation) -> str:
    return f"{int(e.degenerate.sum())}/{e.degenerate.numel()}"


@dataclass(repr=False)
class Explanation:
    """One method at one layer, for a batch of B images and T targets per image.

    Attributes:
        method: The method id (``gradcam``).
        title: The method's display name.
        layer: The layer key.
        variant: The method's options as used (e.g. ``{"alpha_normalize": False, "relu": True}``).
        raw: ``(B, T, h, w)`` float32 signed raw maps at layer resolution, before any ReLU
            (``(B, T, d, h, w)`` for volumes).
        maps: ``(B, T, H, W)`` float32 maps in [0, 1] at input resolution (ReLU'd if ``variant["relu"]``;
            ``(B, T, D, H, W)`` for volumes).
        degenerate: ``(B, T)`` bool: the map was constant or all zero and is returned as zeros.
        target_classes: ``(B, T)`` explained class indices (``-1`` for custom targets).
        target_names: One description per target.
        scores: ``(B, T)`` the explained scores.
        images: ``(B, H, W, 3)`` uint8 images the maps align with (for overlays), or None; for volumes, the
            middle depth slice ``D // 2`` of each input.
        image_names: One name per image (file stems), used for file names.
        class_names: Class names of the model, or None.
        manifest: Model, weights, preprocessing and versions (JSON-serialisable).
        extras: Per-map diagnostics a method reported, name -> ``(B, T)`` (e.g. ``convergence_delta``).
    """

    method: str
    title: str
    layer: str
    variant: dict[str, Any]
    raw: torch.Tensor
    maps: torch.Tensor
    degenerate: torch.Tensor
    target_classes: torch.Tensor
    target_names: list[str]
    scores: torch.Tensor
    images: torch.Tensor | None = None
    image_names: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        """A one-line summary (method, layer, shapes, targets, degenerate maps): no tensor dumps."""
        variant = f"{self.variant}" if self.variant else "{}"
        return (
            f"Explanation(method={self.method!r}, layer={self.layer!r}, images={self.batch_size}, "
            f"targets={self.target_names!r}, raw={_shape(self.raw)}, maps={_shape(self.maps)}, "
            f"degenerate={_degenerate_count(self)}, variant={variant})"
        )

    @property
    def batch_size(self) -> int:
        """Number of images."""
        return int(self.raw.shape[0])

    @property
    def num_targets(self) -> int:
        """Number of targets per image."""
        return int(self.raw.shape[1])

    @property
    def is_volume(self) -> bool:
        """Whether the maps are volumes ``(B, T, D, H, W)`` (a ``Conv3d`` network) rather than images."""
        return self.maps.ndim == 5

    @property
    def depth_slice(self) -> int | None:
        """For volumes, the depth index ``D // 2`` that ``images`` and the saved PNGs show; None for images."""
        return int(self.maps.shape[2]) // 2 if self.is_volume else None

    def require_images(self, what: str) -> None:
        """Refuse a volume where only 2-D maps ``(B, T, H, W)`` make sense (metrics, figures), naming ``what``.

        Raises:
            InputShapeError: The maps are volumes; the message says how to take a slice.

        Example:
            >>> e = Explanation("gradcam", "Grad-CAM", "conv", {}, torch.zeros(1, 1, 2, 4, 4),
            ...                 torch.zeros(1, 1, 8, 16, 16), torch.zeros(1, 1, dtype=torch.bool),
            ...                 torch.zeros(1, 1, dtype=torch.long), ["0"], torch.zeros(1, 1))
            >>> e.require_images("the pointing game")
            Traceback (most recent call last):
            ...
            cnnlens.errors.InputShapeError: 2-D maps (B, T, H, W) only for the pointing game: gradcam at layer ...
        """
        if self.is_volume:
            raise InputShapeError(
                f"2-D maps (B, T, H, W) only for {what}: {self.method} at layer {self.layer!r} holds volumes "
                f"{_shape(self.maps)} (B, T, D, H, W) from a Conv3d network; pass one depth slice instead, e.g. "
                f"explanation.maps[:, :, {self.depth_slice}] (the middle slice), or save() the volumes as arrays."
            )

    def class_label(self, b: int, t: int) -> str:
        """A readable label of target ``t`` of image ``b`` (class name when known)."""
        idx = int(self.target_classes[b, t])
        if idx < 0:
            return self.target_names[t]
        if self.class_names is not None and idx < len(self.class_names):
            return f"{idx} {self.class_names[idx]}"
        return str(idx)

    def describe(self) -> dict[str, Any]:
        """Everything about this result except the arrays, JSON-serialisable."""
        return {
            "method": self.method,
            "title": self.title,
            "layer": self.layer,
            "variant": self.variant,
            "raw_shape": list(self.raw.shape),
            "map_shape": list(self.maps.shape),
            "depth_slice": self.depth_slice,
            "degenerate": self.degenerate.tolist(),
            "target_classes": self.target_classes.tolist(),
            "target_names": self.target_names,
            "scores": self.scores.double().tolist(),
            "extras": {k: v.double().tolist() for k, v in self.extras.items()},
        }

    def save(self, directory: str | os.PathLike[str], **kwargs: Any) -> list[Path]:
        """Write this result's files and a manifest; see :meth:`ExplanationSet.save`."""
        return ExplanationSet([self], manifest=self.manifest).save(directory, **kwargs)

    def _repr_html_(self) -> str:
        """Jupyter's view: the first maps over their images (inline PNGs) with image, class, score, layer."""
        heading = (
            f"{self.title} ({self.method}) at {self.layer}: {self.batch_size} image(s) x {self.num_targets} "
            f"target(s), degenerate maps {_degenerate_count(self)}"
        )
        return explanations_html([self], heading=heading)

    def figure(self, *, limit: int = DISPLAY_LIMIT, columns: int = 4, **figure_kwargs: Any) -> Figure:
        """The maps over their images as a matplotlib figure (no pyplot: safe under any backend).

        Args:
            limit: Most maps drawn; a last line counts the others.
            columns: Tiles per row.
            **figure_kwargs: Passed to :class:`matplotlib.figure.Figure` (``figsize``, ``dpi``).
        """
        return draw_tiles([self], limit=limit, columns=columns, **figure_kwargs)

    def show(self, *, limit: int = DISPLAY_LIMIT, columns: int = 4) -> None:
        """Draw the maps with pyplot and show them (a window in scripts, inline in Jupyter, nothing under Agg)."""
        show_tiles([self], limit=limit, columns=columns)


class ExplanationSet(Sequence[Explanation]):
    """All the results of one :func:`cnnlens.explain` call: one :class:`Explanation` per (method, layer).

    Index it by position, by ``(method, layer)`` (one :class:`Explanation`), or by a method id alone
    (``result["gradcam"]``: a dict layer -> :class:`Explanation` of that method, in the call's layer order);
    ``logits`` and ``probabilities`` are the model's.

    Example:
        >>> # result = cnnlens.explain(model, x, methods=["gradcam", "gradcampp"], layers=["layer3", "layer4"])
        >>> # result["gradcampp", "layer4"].maps.shape  -> (B, 1, H, W)
        >>> # result["gradcam"]  -> {"layer3": Explanation(...), "layer4": Explanation(...)}
    """

    def __init__(
        self,
        items: Sequence[Explanation],
        *,
        logits: torch.Tensor | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self._items = list(items)
        self.logits = logits
        self.manifest = dict(manifest or {})

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Explanation]:
        return iter(self._items)

    @overload
    def __getitem__(self, key: int) -> Explanation: ...
    @overload
    def __getitem__(self, key: slice) -> Sequence[Explanation]: ...
    @overload
    def __getitem__(self, key: tuple[str, str | None]) -> Explanation: ...
    @overload
    def __getitem__(self, key: str) -> dict[str, Explanation]: ...
    def __getitem__(
        self, key: int | slice | tuple[str, str | None] | str
    ) -> Explanation | Sequence[Explanation] | dict[str, Explanation]:
        if isinstance(key, tuple):
            return self.get(*key)
        if isinstance(key, str):
            return self.by_method(key)
        return self._items[key]

    def __repr__(self) -> str:
        """A short summary: images, targets, methods, layers, degenerate maps, one line per result."""
        if not self._items:
            return "ExplanationSet(empty)"
        first = self._items[0]
        degenerate = sum(int(e.degenerate.sum()) for e in self._items)
        total = sum(e.degenerate.numel() for e in self._items)
        head = (
            f"ExplanationSet({len(self._items)} results: {first.batch_size} image(s) x {first.num_targets} "
            f"target(s) {first.target_names!r}; methods {self.methods}; layers {self.layers}; "
            f"degenerate maps {degenerate}/{total})"
        )
        width = max(len(f"{e.method} @ {e.layer}") for e in self._items)
        lines = [
            f"  {f'{e.method} @ {e.layer}':<{width}}  raw {_shape(e.raw)}  degenerate {_degenerate_count(e)}"
            for e in self._items[:12]
        ]
        if len(self._items) > 12:
            lines.append(f"  ... and {len(self._items) - 12} more")
        return "\n".join([head, *lines])

    def _repr_html_(self) -> str:
        """Jupyter's view: the top prediction per image, then the first maps as inline overlays with captions."""
        if not self._items:
            return "<div><b>ExplanationSet (empty)</b></div>"
        first = self._items[0]
        heading = (
            f"{len(self._items)} results: {first.batch_size} image(s) x {first.num_targets} target(s); "
            f"methods {', '.join(self.methods)}; layers {', '.join(self.layers)}"
        )
        names = first.image_names
        notes = [
            f"{names[b] if b < len(names) else f'image{b:04d}'}: predicted "
            + ", ".join(f"{i} {n} ({p:.1%})" for i, n, p in row)
            for b, row in enumerate(self.top_k(3))
        ]
        return explanations_html(self._items, heading=heading, notes=notes[:DISPLAY_LIMIT])

    def figure(self, *, limit: int = DISPLAY_LIMIT, columns: int = 4, **figure_kwargs: Any) -> Figure:
        """Every result's maps over their images as a matplotlib figure, image by image (no pyplot).

        Args:
            limit: Most maps drawn; a last line counts the others.
            columns: Tiles per row.
            **figure_kwargs: Passed to :class:`matplotlib.figure.Figure` (``figsize``, ``dpi``).
        """
        return draw_tiles(self._items, limit=limit, columns=columns, **figure_kwargs)

    def show(self, *, limit: int = DISPLAY_LIMIT, columns: int = 4) -> None:
        """Draw the maps with pyplot and show them (a window in scripts, inline in Jupyter, nothing under Agg)."""
        show_tiles(self._items, limit=limit, columns=columns)

    def get(self, method: str, layer: str | None) -> Explanation:
        """The result of ``method`` at ``layer``.

        ``layer=None`` returns a method's only result (an input- or network-scope method such as
        ``saliency`` has one, under the layer key ``"input"``/``"network"``). A layer of a nested Keras model,
        keyed by its path (``vgg16/block5_conv3``), is also found by its bare name (``block5_conv3``) when no
        other result of the method has that last part. For compatibility, any layer
        name also returns an input- or network-scope method's single result: its map does not depend on it.

        Raises:
            MethodNotFoundError: The set holds no result of ``method``.
            LayerNotFoundError: The set holds ``method`` but not at ``layer`` (or at several layers, for None).
        """
        for item in self._items:
            if item.method == method and item.layer == layer:
                return item
        found = self.by_method(method)
        if len(found) == 1 and (layer is None or next(iter(found)) in ("input", "network")):
            return next(iter(found.values()))
        layers = list(found)
        if layer is not None and "/" not in layer:  # a bare Keras layer name: the last part of one path
            paths = [name for name in layers if name.rsplit("/", 1)[-1] == layer]
            if len(paths) == 1:
                return found[paths[0]]
            if paths:
                raise LayerNotFoundError(
                    f"the layer name {layer!r} is ambiguous: {method!r} was computed at {paths}; pass the full path."
                )
        raise LayerNotFoundError(
            f"no result for ({method!r}, {layer!r}); {method!r} was computed at layers {layers}: use one of them."
        )

    def by_method(self, method: str) -> dict[str, Explanation]:
        """Every layer's result of one method, as a dict layer -> :class:`Explanation` (call order).

        ``result["gradcam"]`` is the same.

        Raises:
            MethodNotFoundError: The set holds no result of ``method`` (the message lists what it holds).
        """
        found = {e.layer: e for e in self._items if e.method == method}
        if not found:
            raise MethodNotFoundError(
                f"no result for method {method!r}; this set holds methods {self.methods}: index with one of "
                "them, or pass the method to explain(methods=[...])."
            )
        return found

    @property
    def methods(self) -> list[str]:
        """Method ids, in order, without repeats."""
        return list(dict.fromkeys(e.method for e in self._items))

    @property
    def layers(self) -> list[str]:
        """Layer keys, in order, without repeats."""
        return list(dict.fromkeys(e.layer for e in self._items))

    @property
    def probabilities(self) -> torch.Tensor | None:
        """Softmax of the logits ``(B, K)``, or None when the set carries no logits."""
        return None if self.logits is None else torch.softmax(self.logits.float(), dim=1)

    def top_k(self, k: int = 5) -> list[list[tuple[int, str, float]]]:
        """Per image, the ``k`` most probable classes as ``(index, name, probability)``."""
        probs = self.probabilities
        if probs is None:
            return []
        names = self._items[0].class_names if self._items else None
        k = min(k, probs.shape[1])
        values, indices = torch.topk(probs, k, dim=1)
        return [
            [
                (int(i), names[int(i)] if names and int(i) < len(names) else str(int(i)), float(v))
                for v, i in zip(vals, idxs, strict=True)
            ]
            for vals, idxs in zip(values, indices, strict=True)
        ]

    def write_files(
        self,
        directory: str | os.PathLike[str],
        *,
        cmap: str = "jet",
        alpha: float = 0.5,
        heatmaps: bool = True,
        raw: bool = True,
        sparse_cmap: str = SPARSE_CMAP,
    ) -> tuple[list[Path], list[dict[str, Any]]]:
        """Write the per-map files under ``directory``; return the paths and one manifest entry per map.

        Layout: ``<image>/<method>__<layer>__<target>.overlay.png`` (the map over the preprocessed image),
        ``.heatmap.png`` (the coloured map) and ``.raw.npy`` (the signed layer-resolution map, float32).
        Volumes (maps ``(B, T, D, H, W)``): the PNGs show the middle depth slice ``D // 2`` (the entry's
        ``depth_slice``), ``.raw.npy`` holds the whole ``(d, h, w)`` raw volume and ``.map.npy`` the whole
        upsampled, normalised ``(D, H, W)`` map (float32), written whenever ``raw`` is True.
        Class-activation maps use ``cmap`` at opacity ``alpha``; pixel attributions (saliency, guided
        backprop, Integrated Gradients...: sparse maps) use ``sparse_cmap`` scaled to their 99th percentile,
        with an opacity proportional to the map (:func:`cnnlens.imaging.overlay_weighted`), so the photo shows
        where they are zero. Each entry records the colour map, the method's traits (``input_level``,
        ``class_independent``) and the options that differ from the method's defaults. Every PNG carries the
        model and weights source (no machine path: :func:`cnnlens.display.public_path`) as text metadata.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        entries: list[dict[str, Any]] = []
        png_text = _png_text(self.manifest)
        for exp in self._items:
            images = exp.images.cpu().numpy() if exp.images is not None else None
            maps = exp.maps.detach().float().cpu().numpy()
            depth = exp.depth_slice
            volumes = maps if depth is not None else None
            if depth is not None:  # volumes (B, T, D, H, W): the PNGs show the middle slice
                maps = maps[:, :, depth]
            raws = exp.raw.detach().float().cpu().numpy()
            keys = _image_keys(exp.image_names, exp.batch_size)
            traits = method_traits(exp.method)
            exp_cmap = sparse_cmap if traits.sparse else cmap
            for b in range(exp.batch_size):
                image_name, folder_name = keys[b]
                folder = root / folder_name
                folder.mkdir(parents=True, exist_ok=True)
                for t in range(exp.num_targets):
                    label = exp.class_label(b, t)
                    stem = f"{_slug(exp.method)}__{_slug(exp.layer)}__{_slug(label)}"
                    files: dict[str, str] = {}
                    pictures: dict[str, np.ndarray] = {}
                    if images is not None and traits.sparse:
                        pictures["overlay"] = overlay_weighted(images[b], maps[b, t], cmap=exp_cmap)
                    elif images is not None:
                        pictures["overlay"] = overlay(images[b], maps[b, t], alpha=alpha, cmap=exp_cmap)
                    if heatmaps:
                        shown = clip_percentile(maps[b, t]) if traits.sparse else maps[b, t]
                        pictures["heatmap"] = colorize(shown, exp_cmap)
                    for kind, picture in pictures.items():
                        path = save_png(folder / f"{stem}.{kind}.png", picture, text=png_text)
                        files[kind] = path.relative_to(root).as_posix()
                        written.append(path)
                    if raw:
                        path = folder / f"{stem}.raw.npy"
                        np.save(path, raws[b, t].astype(np.float32))
                        files["raw"] = path.relative_to(root).as_posix()
                        written.append(path)
                        if volumes is not None:  # the PNGs show one slice: keep the whole map too
                            path = folder / f"{stem}.map.npy"
                            np.save(path, volumes[b, t].astype(np.float32))
                            files["map"] = path.relative_to(root).as_posix()
                            written.append(path)
                    entries.append(
                        {
                            "image": image_name,
                            "image_index": b,
                            "method": exp.method,
                            "title": exp.title,
                            "variant": exp.variant,
                            "options": variant_options(exp.method, exp.variant),
                            "layer": exp.layer,
                            "input_level": traits.input_level,
                            "class_independent": traits.class_independent,
                            "cmap": exp_cmap,
                            "target": label,
                            "target_class": int(exp.target_classes[b, t]),
                            "target_name": exp.target_names[t],
                            "score": float(exp.scores[b, t]),
                            "degenerate": bool(exp.degenerate[b, t]),
                            "raw_shape": list(raws.shape[2:]),
                            **({"depth_slice": depth} if depth is not None else {}),
                            **{k: float(v[b, t]) for k, v in exp.extras.items()},
                            "files": files,
                        }
                    )
        return written, entries

    def predictions(self, k: int = 5) -> list[dict[str, Any]]:
        """Per image: its name and top-k predictions, JSON-serialisable."""
        rows = self.top_k(k)
        keys = _image_keys(self._items[0].image_names if self._items else [], len(rows))
        return [
            {"image": keys[b][0], "top": [{"class": i, "name": n, "probability": p} for i, n, p in row]}
            for b, row in enumerate(rows)
        ]

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        cmap: str = "jet",
        alpha: float = 0.5,
        heatmaps: bool = True,
        raw: bool = True,
        overwrite: bool = False,
        title: str = "cnnlens explanations",
    ) -> list[Path]:
        """Write overlays, heatmaps, raw arrays (see :meth:`write_files`), ``manifest.json`` and ``index.html``.

        The folder follows the rules of ``cnnlens explain --out`` (see :class:`ExplainFolder`): a new or empty
        folder, or one an earlier ``save``/``cnnlens explain`` of the same model wrote, whose images stay in the
        merged manifest and index (an image saved again under the same name replaces its earlier files). A
        folder holding other files is refused unless ``overwrite=True`` (then only same-named files are
        replaced; nothing else is deleted). The manifest lists every file with its method, variant, layer,
        target, score and degenerate flag, plus the model, weights source, preprocessing, predictions and
        library versions; ``index.html`` is the page ``cnnlens explain`` writes.

        Raises:
            OutputFolderError: ``directory`` holds files cnnlens did not write, or another model's output.

        Returns:
            Every written path, the manifest and the index last.
        """
        folder = ExplainFolder(directory, model=self.manifest.get("model", {}), overwrite=overwrite)
        written, entries = self.write_files(directory, cmap=cmap, alpha=alpha, heatmaps=heatmaps, raw=raw)
        predictions = self.predictions()
        names = {e["image"]: None for e in entries} | {p["image"]: None for p in predictions}
        manifest_path, index = folder.finish(
            entries, self.manifest, written=written, predictions=predictions, images=names, title=title
        )
        return [*written, manifest_path, index]
