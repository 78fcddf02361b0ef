"""candidate_layers: roles pinned for the seed architectures and the embedded model, plus small cases."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from tests.nets import hook_count
from torch import nn

from cnnlens.candidates import candidate_layers, find_merges
from cnnlens.capture import probe_layers


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    return torchvision.models.vgg16().eval()


def test_vgg16_roles(vgg16: nn.Module) -> None:
    cat = candidate_layers(vgg16, (3, 224, 224))
    assert cat.first("highest_numbered_conv") == "features.28"  # Keras block5_conv3
    assert cat.first("deepest_conv") == "features.28"
    assert cat.with_role("merge") == []  # a straight line
    # the last pool's output is the output of ``features`` itself: one candidate, ``features`` its alias
    assert cat.with_role("block_output") == ["features.4", "features.9", "features.16", "features.23", "features.30"]
    assert cat.first("final_spatial") == "features.30"
    assert next(c for c in cat.layers if c.name == "features.30").aliases == ("features",)
    assert len(cat.with_role("conv")) == 13
    assert hook_count(vgg16) == 0


def test_resnet50_roles() -> None:
    net = torchvision.models.resnet50().eval()
    cat = candidate_layers(net, (3, 224, 224))
    assert cat.merge_method == "fx"
    assert cat.first("final_spatial") == "layer4.2"  # layer4 returns layer4.2's tensor: listed once
    merges = cat.with_role("merge")
    assert len(merges) == 16 and merges[-1] == "layer4.2"
    assert cat.with_role("block_output") == merges  # the 16 bottlenecks
    assert cat.with_role("last_branch_conv") == ["layer4.2.conv3"]
    assert cat.first("highest_numbered_conv") == "layer4.2.conv3"
    layer = next(c for c in cat.layers if c.name == "layer4.2")
    assert layer.aliases == ("layer4",)
    assert layer.shape == (2048, 7, 7) and layer.stride == 32
    assert len(cat.with_role("conv")) == 53


def test_inception_v3_roles() -> None:
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    cat = candidate_layers(net, (3, 299, 299))
    assert cat.first("final_spatial") == "Mixed_7c"
    assert cat.with_role("merge")[-1] == "Mixed_7c"
    assert cat.with_role("last_branch_conv") == [
        "Mixed_7c.branch1x1.conv",
        "Mixed_7c.branch3x3_2a.conv",
        "Mixed_7c.branch3x3_2b.conv",
        "Mixed_7c.branch3x3dbl_3a.conv",
        "Mixed_7c.branch3x3dbl_3b.conv",
        "Mixed_7c.branch_pool.conv",
    ]
    assert cat.first("highest_numbered_conv") == "Mixed_7c.branch_pool.conv"
    assert "AuxLogits" not in {c.name.split(".")[0] for c in cat.layers}  # does not run in eval mode


def test_inception_resnet_v2_roles() -> None:
    net = timm.create_model("inception_resnet_v2", pretrained=False).eval()
    cat = candidate_layers(net, (3, 299, 299))
    assert cat.first("final_spatial") == "conv2d_7b"
    assert cat.with_role("merge")[-1] == "block8"
    assert "block8" in cat.with_role("block_output")
    assert cat.with_role("last_branch_conv") == ["block8.branch0.conv", "block8.branch1.2.conv"]
    assert cat.first("highest_numbered_conv") == "conv2d_7b.conv"


def test_embedded_efficientnet_roles() -> None:
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    cat = candidate_layers(net, (3, 224, 224))
    assert cat.first("final_spatial") == "bn2"
    assert cat.first("highest_numbered_conv") == "conv_head"
    assert cat.with_role("merge")[-1] == "blocks.5.3"


class Branchy(nn.Module):
    """Definition order differs from execution order; a functional top-level add nobody owns."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(3, 4, 3, padding=1)  # defined first, runs last
        self.early = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.early(x)
        b = self.late(x)
        return self.head((a + b).mean(dim=(2, 3)))


def test_definition_and_execution_order_differ() -> None:
    cat = candidate_layers(Branchy(), (3, 8, 8))
    assert cat.first("highest_numbered_conv") == "early"
    assert cat.first("deepest_conv") == "late"
    names, method, notes = find_merges(Branchy())
    assert names == [] and method == "fx"
    assert notes and "outside any submodule" in notes[0]


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = x * 1
        return self.fc(self.block(x).mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)[:, :4]


def test_untraceable_model_falls_back_to_source() -> None:
    cat = candidate_layers(Untraceable(), (3, 6, 6))
    assert cat.merge_method == "source"
    assert cat.with_role("merge") == ["block"]
    assert cat.with_role("last_branch_conv") == ["block.a", "block.b"]


def test_modules_returning_the_same_tensor_are_one_candidate() -> None:
    """``layer4`` returns ``layer4.1``'s tensor: one candidate with both roles, the container as an alias;
    a module whose output an in-place op changed afterwards (``bn1`` before the in-place ReLU) stays apart."""
    net = torchvision.models.resnet18().eval()
    cat = candidate_layers(net, (3, 64, 64))
    names = [c.name for c in cat.layers]
    assert len(names) == len(set(names))
    assert "layer4" not in names and "layer3" not in names
    layer4 = next(c for c in cat.layers if c.name == "layer4.1")
    assert layer4.aliases == ("layer4",)
    assert {"merge", "block_output", "final_spatial"} <= set(layer4.roles)
    infos = {i.name: i for i in probe_layers(net, (3, 64, 64))}
    assert infos["layer4"].same_as == "layer4.1"
    assert infos["bn1"].same_as is None  # the in-place ReLU changed its tensor: a different map
    assert infos["relu"].same_as is None
