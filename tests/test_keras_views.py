"""Keras models (issue 12) through candidate layers and the forward views (filters, feature maps, maximisation).

Roles are checked on a tiny hand-built functional network whose roles are known by construction, then on the
seed's four ``keras.applications`` architectures at small input sizes (the seed's layer names: VGG16
``block5_conv3``, ResNet50 ``conv5_block3_out``, InceptionV3 ``mixed10`` and its branch convolutions,
InceptionResNetV2 ``conv_7b_ac``), a nested frozen transfer model, Sequential and subclassed models. Keras
runs on the torch backend; builds are shared by module fixtures.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
import torch

from cnnlens.candidates import candidate_layers
from cnnlens.capture import probe_layers
from cnnlens.errors import LayerError

if importlib.util.find_spec("keras") is None:  # not imported here: the backend is chosen by cnnlens
    pytest.skip("Keras models need keras 3 (pip install 'cnnlens[keras]')", allow_module_level=True)

from cnnlens.models import LoadedModel, ModelSpec
from cnnlens.models.keras import import_keras, wrap_keras
from cnnlens.models.keras.apps import keras_preprocessing
from cnnlens.views import feature_maps, filters, maximize


@pytest.fixture(scope="module")
def keras() -> Any:
    return import_keras()


def _roles(module: Any, size: int) -> dict[str, tuple[str, ...]]:
    cat = candidate_layers(module, (3, size, size))
    assert cat.merge_method == "keras"
    return {layer.name: layer.roles for layer in cat.layers}


def _with(roles: dict[str, tuple[str, ...]], role: str) -> list[str]:
    return [name for name, r in roles.items() if role in r]


# ------------------------------------------------------------------------------------------- a hand-built graph
@pytest.fixture(scope="module")
def toy(keras: Any) -> Any:
    """stem conv -> pool -> [a: conv | b: conv -> conv] -> concat (mix) -> relu -> [identity | conv r] -> add -> relu."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, padding="same", name="stem")(inp)
    x = layers.MaxPooling2D(name="pool")(x)
    a = layers.Conv2D(3, 1, name="a")(x)
    b = layers.Conv2D(2, 1, name="b1")(x)
    b = layers.Conv2D(5, 3, padding="same", name="b2")(b)
    m = layers.Concatenate(name="mix")([a, b])
    m = layers.Activation("relu", name="mix_out")(m)
    r = layers.Conv2D(8, 3, padding="same", name="r")(m)
    y = layers.Add(name="res")([m, r])
    y = layers.Activation("relu", name="res_out")(y)
    y = layers.GlobalAveragePooling2D(name="gap")(y)
    out = layers.Dense(3, name="logits")(y)
    return wrap_keras(keras.Model(inp, out, name="toy"))


def test_toy_graph_roles_are_the_ones_built(toy: Any) -> None:
    cat = candidate_layers(toy, (3, 16, 16))
    roles = {layer.name: layer.roles for layer in cat.layers}
    assert sorted(_with(roles, "conv")) == ["a", "b1", "b2", "r", "stem"]
    assert _with(roles, "highest_numbered_conv") == ["r"]
    assert _with(roles, "merge") == ["mix", "res"]
    # the final block is res: its identity path (mix_out, feeding two layers) has no conv; no concat inside it
    assert _with(roles, "last_branch_conv") == ["r"]
    # each merge extended over its activation; a model with merges has no pool stage ends
    assert _with(roles, "block_output") == ["mix_out", "res_out"]
    assert _with(roles, "final_spatial") == ["res_out"]
    shapes = {layer.name: (layer.shape, layer.stride, layer.layout) for layer in cat.layers}
    assert shapes["mix_out"] == ((8, 8, 8), 2, "nhwc")  # (C, h, w) map view of a (8, 8, 8) NHWC output
    assert shapes["stem"] == ((4, 16, 16), 1, "nhwc")


def test_last_branch_convs_come_from_the_final_blocks_concatenation(keras: Any) -> None:
    """An Inception-ResNet-like final block: the add's convolution is skipped for the branches of its concat."""
    layers = keras.layers
    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", name="stem")(inp)
    p = layers.Conv2D(2, 1, name="p0")(x)
    q = layers.Conv2D(2, 1, name="q0")(x)
    q = layers.Conv2D(3, 3, padding="same", name="q1")(q)
    mixed = layers.Concatenate(name="mixed")([p, q])
    up = layers.Conv2D(6, 1, name="up")(mixed)
    y = layers.Add(name="join")([x, up])
    out = layers.Dense(2, name="logits")(layers.GlobalAveragePooling2D()(y))
    roles = _roles(wrap_keras(keras.Model(inp, out)), 12)
    assert _with(roles, "merge") == ["join"]  # "mixed" is inside the block: part of its merge, as in torch
    assert sorted(_with(roles, "last_branch_conv")) == ["p0", "q1"]
    assert _with(roles, "block_output") == ["join"]


def test_sequential_and_subclassed_models(keras: Any) -> None:
    layers = keras.layers
    seq = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(4, 3, name="c1"),
            layers.MaxPooling2D(name="p1"),
            layers.Conv2D(8, 3, name="c2"),
            layers.MaxPooling2D(name="p2"),
            layers.GlobalAveragePooling2D(name="g"),
            layers.Dense(3, name="d"),
        ]
    )
    roles = _roles(wrap_keras(seq), 32)
    assert roles == {
        "c1": ("conv",),
        "p1": ("block_output",),
        "c2": ("conv", "highest_numbered_conv", "deepest_conv"),
        "p2": ("block_output", "final_spatial"),
    }

    class Net(keras.Model):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.c1 = layers.Conv2D(4, 3, name="c1")
            self.c2 = layers.Conv2D(6, 3, name="c2")
            self.g = layers.GlobalAveragePooling2D()
            self.d = layers.Dense(3)

        def call(self, x: Any) -> Any:
            return self.d(self.g(self.c2(self.c1(x))))

    net = Net()
    net(keras.ops.zeros((1, 32, 32, 3)))
    cat = candidate_layers(wrap_keras(net), (3, 32, 32))
    assert {layer.name: layer.roles for layer in cat.layers} == {
        "c1": ("conv",),
        "c2": ("conv", "highest_numbered_conv", "deepest_conv", "final_spatial"),
    }
    assert "no layer graph" in cat.notes[0]  # a subclassed model: said, not guessed


# ------------------------------------------------------------------------------------------- the seed's four
@pytest.fixture(scope="module")
def vgg16(keras: Any) -> Any:
    keras.utils.set_random_seed(3)
    return keras.applications.VGG16(weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))


def test_vgg16_roles(vgg16: Any) -> None:
    roles = _roles(wrap_keras(vgg16), 64)
    assert _with(roles, "highest_numbered_conv") == ["block5_conv3"]  # the seed's layer
    assert _with(roles, "deepest_conv") == ["block5_conv3"]
    assert _with(roles, "block_output") == [f"block{i}_pool" for i in range(1, 6)]
    assert _with(roles, "final_spatial") == ["block5_pool"]
    assert not _with(roles, "merge")


@pytest.mark.slow
def test_resnet50_and_a_nested_frozen_transfer_model(keras: Any) -> None:
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    roles = _roles(wrap_keras(base), 64)
    merges = _with(roles, "merge")
    assert len(merges) == 16 and merges[-1] == "conv5_block3_add"  # 3 + 4 + 6 + 3 bottlenecks
    assert _with(roles, "block_output")[-1] == "conv5_block3_out"  # the seed's layer
    assert _with(roles, "final_spatial") == ["conv5_block3_out"]
    assert _with(roles, "last_branch_conv") == ["conv5_block3_3_conv"]  # the identity path has no conv
    assert _with(roles, "highest_numbered_conv") == ["conv5_block3_3_conv"]

    base.trainable = False  # a transfer-learning model: the frozen base nested in an outer model
    inp = keras.Input((64, 64, 3))
    y = keras.layers.Conv2D(8, 1, name="adapt")(base(inp, training=False))
    out = keras.layers.Dense(4, activation="softmax", name="head")(keras.layers.GlobalAveragePooling2D()(y))
    nested = _roles(wrap_keras(keras.Model(inp, out)), 64)
    assert _with(nested, "merge") == [f"resnet50/{m}" for m in merges]
    assert "resnet50/conv5_block3_out" in _with(nested, "block_output")
    assert _with(nested, "last_branch_conv") == ["resnet50/conv5_block3_3_conv"]
    assert _with(nested, "final_spatial") == ["adapt"]
    assert "block_output" in nested["adapt"]  # after the last merge, up to the final spatial output


def _convs(model: Any, names: list[str]) -> list[tuple[int, tuple[int, ...]]]:
    return sorted((model.get_layer(n).filters, tuple(model.get_layer(n).kernel_size)) for n in names)


@pytest.mark.slow
def test_inception_v3_and_inception_resnet_v2_roles(keras: Any) -> None:
    v3 = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(139, 139, 3))
    roles = _roles(wrap_keras(v3), 139)
    assert _with(roles, "merge") == [f"mixed{i}" for i in range(11)]  # mixed9_0, mixed9_1... are inside blocks
    assert _with(roles, "block_output") == [f"mixed{i}" for i in range(11)]
    assert _with(roles, "final_spatial") == ["mixed10"]
    # mixed10's branches (Szegedy et al. 2016, figure 7): 1x1 320; 1x3 and 3x1 384 twice; pool branch 1x1 192
    expected = sorted([(320, (1, 1)), (384, (1, 3)), (384, (3, 1)), (384, (1, 3)), (384, (3, 1)), (192, (1, 1))])
    assert _convs(v3, _with(roles, "last_branch_conv")) == expected

    irv2 = keras.applications.InceptionResNetV2(weights=None, include_top=False, input_shape=(139, 139, 3))
    roles = _roles(wrap_keras(irv2), 139)
    assert _with(roles, "highest_numbered_conv") == ["conv_7b"]
    assert _with(roles, "final_spatial") == ["conv_7b_ac"]
    blocks = _with(roles, "block_output")
    assert blocks[-1] == "conv_7b_ac" and blocks[-2] == _with(roles, "merge")[-1]  # the last block8's output
    assert type(irv2.get_layer(blocks[-2])).__name__ == "CustomScaleLayer"
    # the last block8's concatenation: branch 0 (1x1 192) and branch 1's last conv (3x1 256)
    assert _convs(irv2, _with(roles, "last_branch_conv")) == [(192, (1, 1)), (256, (3, 1))]


# ------------------------------------------------------------------------------------------- forward views
@pytest.fixture(scope="module")
def vgg_loaded(vgg16: Any) -> LoadedModel:
    prep = keras_preprocessing("caffe", 64)
    module = wrap_keras(vgg16, preprocessing=prep)
    spec = ModelSpec("keras-vgg16-64", "vgg", "keras", prep, 512, "block5_conv3", {}, "test model")
    return LoadedModel(module, spec, [f"c{i}" for i in range(512)], "random", random_weights=True)


def test_filters_are_the_keras_kernels_in_torch_order(vgg16: Any, vgg_loaded: LoadedModel) -> None:
    kernel = torch.as_tensor(vgg16.get_layer("block1_conv1").kernel.value)  # HWIO (3, 3, 3, 64)
    fs = filters(vgg_loaded)  # the first conv; a 'caffe' model takes BGR: tiles shown as R, G, B
    assert fs.layer == "block1_conv1" and fs.view == "rgb" and fs.weight_shape == (64, 3, 3, 3)
    for k in (0, 17, 63):
        assert torch.equal(fs.tiles[k], kernel[:, :, :, k].permute(2, 0, 1).flip(0))
    assert fs.input_channels[0] == [2, 1, 0]
    deep = torch.as_tensor(vgg16.get_layer("block3_conv2").kernel.value)
    fm = filters(vgg_loaded, "block3_conv2", view="mean", channels=[5, 9], top_k=None)
    assert torch.allclose(fm.tiles, deep[:, :, :, [5, 9]].mean(dim=2).permute(2, 0, 1))
    with pytest.raises(LayerError, match=r"not an nn\.Conv2d"):
        filters(vgg_loaded, "block3_pool")


def test_depthwise_filters(keras: Any) -> None:
    layers = keras.layers
    inp = keras.Input((8, 8, 2))
    y = layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(inp)
    out = layers.Dense(2)(layers.GlobalAveragePooling2D()(y))
    net = wrap_keras(keras.Model(inp, out))
    kernel = torch.as_tensor(net.keras_model.get_layer("dw").kernel.value)  # (3, 3, C_in=2, multiplier=2)
    fs = filters(net, "dw", view="mean", top_k=None)
    assert fs.groups == 2 and fs.in_channels == 2 and fs.weight_shape == (4, 1, 3, 3) and fs.depthwise
    for k in range(4):  # filter k = c * multiplier + j sees input channel c only
        c, j = divmod(k, 2)
        assert torch.equal(fs.tiles[k], kernel[:, :, c, j]) and fs.input_channels[k] == [c]


def test_feature_maps_are_the_keras_layer_outputs_channels_first(keras: Any, vgg16: Any, vgg_loaded: Any) -> None:
    image = (np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8)
    x = vgg_loaded.spec.preprocessing.to_tensor(image)
    fm = feature_maps(vgg_loaded, image, ["block5_conv3", "block4_pool"], top_k=4)
    sub = keras.Model(vgg16.inputs, vgg16.get_layer("block5_conv3").output)
    with torch.no_grad():
        want = torch.as_tensor(sub(x[None].permute(0, 2, 3, 1), training=False))[0].permute(2, 0, 1)
    got = fm["block5_conv3"].activation
    assert got.shape == (512, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    means = want.mean(dim=(1, 2))
    assert fm["block5_conv3"].indices == torch.argsort(means, descending=True)[:4].tolist()


def test_maximize_on_a_keras_model_built_for_another_size(vgg_loaded: LoadedModel) -> None:
    """The optimised 48 px images are resized to the 64 px the Keras model accepts (transforms included)."""
    before = {n: p.detach().clone() for n, p in vgg_loaded.module.named_parameters()}
    res = maximize(vgg_loaded, "block5_conv3", [3, 7], steps=2, size=48, threads=1)
    assert res.images.shape == (2, 3, 48, 48) and bool(torch.isfinite(res.scores).all())
    assert res.history.shape == (2, 2)
    after = dict(vgg_loaded.module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # weights untouched


def test_probe_sees_every_keras_layer_once(toy: Any) -> None:
    infos = {i.name: i for i in probe_layers(toy, (3, 16, 16))}
    assert infos["mix"].shape == (8, 8, 8) and infos["mix"].calls == 1
    assert infos["logits"].calls == 1  # no softmax: the model's own output
