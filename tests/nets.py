"""Small networks used across the tests (built in the tests, never downloaded)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import InceptionOutputs


class GapHead(nn.Module):
    """conv -> ReLU -> conv -> ReLU ("features") -> GAP -> Linear: Grad-CAM equals CAM / (H*W) here."""

    def __init__(self, channels: int = 6, classes: int = 5, inplace: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(8, channels, 3, padding=1, stride=2),
            nn.ReLU(inplace=inplace),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


class VggStyle(nn.Module):
    """conv followed by an in-place ReLU, and an FC head without GAP (Grad-CAM != HiResCAM here)."""

    def __init__(self, inplace: bool = True, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(inplace=inplace),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(inplace=inplace), nn.Linear(16, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Residual(nn.Module):
    """A residual block whose output is built with an in-place ``+=`` (ResNet style)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.stem(x))
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(out.mean(dim=(2, 3)))


class Wrapped(nn.Module):
    """Returns its inner model's logits wrapped as a tuple, a dict or InceptionOutputs."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner = inner
        self.kind = kind

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        logits = self.inner(x)
        if self.kind == "tuple":
            return logits, logits.detach() * 0
        if self.kind == "dict":
            return {"logits": logits, "features": torch.zeros(1)}
        if self.kind == "inception":
            return InceptionOutputs(logits, None)
        if self.kind == "attr":
            return type("Out", (), {"logits": logits})()
        raise ValueError(self.kind)


class Exploding(nn.Module):
    """Raises inside forward after the target layer ran, to test hook hygiene on errors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.conv(x)
        raise RuntimeError("boom inside forward")


class LinearOnMap(nn.Module):
    """Identity "feat" layer then a Linear on the flattened map: lets a test set the activation exactly."""

    def __init__(self, weight: list[float]) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(len(weight), 1, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([weight], dtype=self.fc.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).flatten(1))


def seeded(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Re-initialise a model's parameters deterministically, give BN non-trivial statistics, cast."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.to(dtype).eval()


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", OrderedDict()))
        for m in model.modules()
    )
