"""Explain output folders: the manifest, the marker rules and the merge of a folder written again.

:class:`ExplainFolder` claims an explain folder (``cnnlens explain --out``, :meth:`ExplanationSet.save`) under the
rules of :mod:`cnnlens.outputs_dir`, merges new results with the earlier ones, writes ``manifest.json``
(:func:`write_manifest`) and has the page ``index.html`` written by the report layer through
:mod:`cnnlens.index_hook`. Kept apart from :mod:`cnnlens.explanation` (the result types) for size.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from cnnlens.display import scrub_paths
from cnnlens.index_hook import index_writer
from cnnlens.jsonfile import dumps_strict
from cnnlens.outputs_dir import OutputFolderError, OwnedFolder, claim_output_dir

__all__ = ["ExplainFolder", "environment_versions", "write_manifest"]


def environment_versions() -> dict[str, str]:
    """Versions of cnnlens, Python and the libraries that shape results, for manifests.

    With a Keras model in the process (Keras imported), also ``keras`` and ``keras_backend`` (``"torch"``).
    """
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("cnnlens", "torch", "torchvision", "timm", "numpy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    keras = sys.modules.get("keras")  # imported only when a Keras model was asked for
    if keras is not None:
        versions["keras"] = str(getattr(keras, "__version__", "unknown"))
        versions["keras_backend"] = str(keras.backend.backend())
    return versions


def _model_identity(model: Any) -> tuple[str, str, bool]:
    if not isinstance(model, Mapping):
        return ("", "", False)
    name = str(model.get("name", model.get("class", "")))
    return (name, str(model.get("weights_source", "")), bool(model.get("random_weights")))


def _legacy_explain_files(folder: Path) -> set[str] | None:
    """The files of an explain folder written by a cnnlens without markers, or None if ``folder`` is not one.

    Proof: its ``manifest.json`` is an explain or demo manifest and every visible entry of the folder is
    ``manifest.json``, ``index.html`` or an image folder holding only files that manifest lists.
    """
    from cnnlens.outputs_dir import read_marker

    if not folder.is_dir() or read_marker(folder) is not None:
        return None
    try:
        doc = json.loads((folder / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("command") not in {"explain", "demo"}:
        return None
    listed = {str(f) for r in doc.get("results", []) for f in r.get("files", {}).values()}
    files = {"manifest.json", "index.html"}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name in files:
            continue
        if not entry.is_dir() or entry.is_symlink():
            return None
        for sub in entry.iterdir():
            rel = f"{entry.name}/{sub.name}"
            if rel not in listed or not sub.is_file():
                return None
            files.add(rel)
    return {f for f in files if (folder / f).is_file()}


class ExplainFolder:
    """The output folder of ``cnnlens explain`` and :meth:`ExplanationSet.save`, claimed for writing.

    Rules (see :mod:`cnnlens.outputs_dir`): a new or empty folder is marked as cnnlens output; a folder an
    earlier explain of the **same model** wrote is reused and its index merged (earlier images are kept; an
    image explained again replaces its earlier entries and files); a folder explained with another model, or one
    holding files cnnlens did not write, is refused. ``overwrite=True`` starts over in a folder cnnlens owns
    (removing only the files its marker lists) or writes into a foreign one (replacing only same-named files).

    Args:
        directory: The output folder.
        model: The model manifest (``LoadedModel.manifest()``) of the new results.
        overwrite: See above.
        option: The option name used in messages.

    Raises:
        OutputFolderError: The folder is refused (the message says why and names ``--overwrite``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        model: Mapping[str, Any],
        overwrite: bool = False,
        option: str = "--out",
    ) -> None:
        legacy = _legacy_explain_files(Path(directory))
        self.owned: OwnedFolder = claim_output_dir(
            directory, "explain", overwrite=overwrite, option=option, legacy=legacy is not None
        )
        if legacy is not None:  # an older cnnlens's output: its own manifest lists every file it wrote
            self.owned.files |= legacy
            self.owned.previous = {"kind": "explain"}
            self.owned.save()
        self.root = self.owned.root
        self.previous: dict[str, Any] = {}
        if not self.owned.reused:
            return
        if overwrite:
            self.owned.remove_listed()
            return
        path = self.root / "manifest.json"
        if self.owned.owns("manifest.json") and path.is_file():
            try:
                self.previous = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                self.previous = {}
        before = _model_identity(self.previous.get("model"))
        if self.previous and before != _model_identity(model):
            raise OutputFolderError(
                f"{option} {str(self.root)!r} holds explanations of model {before[0]!r} ({before[1]}); these are "
                f"of {_model_identity(model)[0]!r} ({_model_identity(model)[1]}), and one index cannot mix them. "
                "Choose another folder, or pass --overwrite to replace the earlier explanations (only files "
                "cnnlens wrote there are removed)."
            )

    @property
    def taken(self) -> dict[str, str | None]:
        """Image names used by earlier explanations in the folder, with their source paths (None unknown)."""
        names: dict[str, str | None] = {}
        for r in self.previous.get("results", []):
            names.setdefault(str(r.get("image")), None)
        for p in self.previous.get("predictions", []):
            names.setdefault(str(p.get("image")), None)
        for item in self.previous.get("images", []):
            names[str(item.get("name"))] = item.get("source")
        return names

    def finish(
        self,
        entries: Sequence[Mapping[str, Any]],
        manifest: Mapping[str, Any],
        *,
        written: Sequence[Path],
        predictions: Sequence[Mapping[str, Any]] = (),
        failures: Sequence[Mapping[str, Any]] = (),
        images: Mapping[str, str | None] | None = None,
        title: str = "cnnlens explanations",
        subtitle: str | None = None,
    ) -> tuple[Path, Path]:
        """Merge with the earlier explanations, write ``manifest.json`` and ``index.html``, update the marker.

        Args:
            entries: The new result entries (:meth:`ExplanationSet.write_files`).
            manifest: Provenance of the new results (``command``, ``model``...).
            written: The files the new results wrote.
            predictions: The new predictions.
            failures: Inputs that failed in this call.
            images: Name -> source path of every image of this call (its earlier entries are replaced).
            title: Title of the index page.
            subtitle: Subtitle (default: the number of images and the model).

        Returns:
            ``(manifest path, index path)``.
        """
        new = dict(images or {})
        for e in entries:
            new.setdefault(str(e["image"]), None)
        for p in predictions:
            new.setdefault(str(p["image"]), None)
        prev = self.previous
        rewritten = {self.owned.rel(p) for p in written}
        stale = {
            f
            for r in prev.get("results", [])
            if r.get("image") in new
            for f in r.get("files", {}).values()
            if f not in rewritten and self.owned.owns(f)
        }
        if stale:  # files of images explained again that this call did not rewrite: listed, so removable
            OwnedFolder(self.root, "explain", self.owned.id, files=set(stale)).remove_listed()
            self.owned.files -= stale
        kept_results = [r for r in prev.get("results", []) if r.get("image") not in new]
        kept_predictions = [p for p in prev.get("predictions", []) if p.get("image") not in new]
        sources = {os.path.abspath(s) for s in new.values() if s} | {
            os.path.abspath(str(f.get("path"))) for f in failures
        }
        kept_failures = [f for f in prev.get("failures", []) if os.path.abspath(str(f.get("path"))) not in sources]
        old_images = [i for i in prev.get("images", []) if i.get("name") not in new]
        listed = [{"name": n, "source": s} for n, s in new.items()]
        all_images = [*old_images, *listed]
        path = write_manifest(
            self.root,
            [*kept_results, *entries],
            manifest,
            predictions=[*kept_predictions, *predictions],
            failures=[*kept_failures, *failures],
            images=all_images,
        )
        model = manifest.get("model", {})
        name = model.get("name", model.get("class", "")) if isinstance(model, Mapping) else ""
        count = len({*(str(i["name"]) for i in all_images), *(str(r.get("image")) for r in kept_results)})
        index = index_writer()(  # the report layer's page (cnnlens.index_hook)
            self.root, title=title, subtitle=subtitle if subtitle is not None else f"{count} image(s), model {name}"
        )
        self.owned.record([*written, path, index])
        self.owned.save()
        return path, index


def _png_text(manifest: Mapping[str, Any]) -> dict[str, str]:
    model = manifest.get("model", {})
    text = {"Software": f"cnnlens {environment_versions().get('cnnlens', '')}".strip()}
    if isinstance(model, Mapping):
        text["cnnlens:model"] = str(model.get("name", model.get("class", "")))
        if "weights_source" in model:
            text["cnnlens:weights"] = str(scrub_paths(str(model["weights_source"])))
        if model.get("random_weights"):
            text["cnnlens:warning"] = "RANDOM WEIGHTS: not a trained model"
    return text


def write_manifest(
    directory: str | os.PathLike[str],
    entries: Sequence[Mapping[str, Any]],
    manifest: Mapping[str, Any],
    *,
    predictions: Sequence[Mapping[str, Any]] = (),
    failures: Sequence[Mapping[str, Any]] = (),
    images: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write ``manifest.json``: provenance, versions, predictions, every result entry and any failures.

    ``images`` (optional) lists each image's output name and source path (``{"name", "source"}``).
    """
    doc = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "versions": environment_versions(),
        "predictions": list(predictions),
        "results": list(entries),
        "failures": list(failures),
    }
    if images:
        doc["images"] = [dict(i) for i in images]
    path = Path(directory) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_strict(doc, indent=2, default=str) + "\n", encoding="utf-8")  # NaN -> null
    return path
