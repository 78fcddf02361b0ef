"""The Keras adapter core (issue 12): KerasModule, wrap_keras, load_keras, layer paths, layouts, backend check.

Keras runs on the torch backend; builds are shared through module-scoped fixtures and kept small (a 64x64
VGG16 base inside a transfer model, tiny Sequential and subclassed models, one full 224 VGG16).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnlens import explain
from cnnlens.errors import (
    LayerNotFoundError,
    ModelConfigError,
    ModelTypeError,
    WeightsMismatchError,
    WeightsUnavailableError,
)
from cnnlens.models import load_model

if importlib.util.find_spec("keras") is None:  # not imported here: the backend is chosen by cnnlens
    pytest.skip("the Keras adapter needs keras 3 (pip install 'cnnlens[keras]')", allow_module_level=True)

from cnnlens.models.keras import (
    KerasBackendError,
    KerasModule,
    import_keras,
    is_keras_model,
    keras_layers,
    kernel_oihw,
    load_keras,
    wrap_keras,
)


@pytest.fixture(scope="module")
def keras() -> Any:
    return import_keras()


@pytest.fixture(scope="module")
def transfer(keras: Any) -> Any:
    """A keras.applications VGG16 base (64x64, frozen) inside an outer model with a new softmax head."""
    keras.utils.set_random_seed(1)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 64, 3))
    base.trainable = False
    inp = keras.Input((64, 64, 3))
    y = base(inp, training=False)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    out = keras.layers.Dense(5, activation="softmax", name="head")(y)
    return keras.Model(inp, out, name="transfer")


@pytest.fixture(scope="module")
def sequential(keras: Any) -> Any:
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [
            keras.Input((16, 12, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.ReLU(name="relu"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(3, name="dense"),
            keras.layers.Softmax(name="probs"),
        ],
        name="seq",
    )


@pytest.fixture(scope="module")
def vgg224() -> Any:
    return load_model("keras:vgg16", random_weights=True)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def _snapshot(model: Any) -> tuple[list[np.ndarray], list[bool], list[bool]]:
    """Every weight's value, every layer's ``trainable`` flag and every weight's ``requires_grad``."""
    values = [np.array(v.numpy(), copy=True) for v in model.weights]
    flags = [bool(layer.trainable) for _, layer in keras_layers(model)]
    grads = [bool(v.value.requires_grad) for v in model.weights]
    return values, flags, grads


def _no_hooks(net: KerasModule) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for _, m in net.named_modules())


def test_transfer_logits_are_the_pre_softmax(transfer: Any) -> None:
    net = wrap_keras(transfer)
    x = _images(3, 64, 64)
    with torch.no_grad():
        logits = net(x)
        probs = transfer(x.permute(0, 2, 3, 1), training=False)
    assert logits.shape == (3, 5)
    assert "pre-softmax" in net.logits_from and "'head'" in net.logits_from
    # log softmax(z) = z - logsumexp(z): logits minus log-probabilities is one constant per row
    diff = logits - torch.log(probs)
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-4)
    assert torch.allclose(torch.softmax(logits, -1), probs, atol=1e-6)
    assert not torch.allclose(logits, probs)


def test_layers_listed_by_keras_path_with_bare_aliases(transfer: Any) -> None:
    net = wrap_keras(transfer)
    names = [n for n, _ in net.named_modules()]
    assert names[:3] == ["", "vgg16", "vgg16/block1_conv1"]
    assert "vgg16/block5_conv3" in names and "head" in names and "gap" in names
    assert not any("input" in n or "_torch_params" in n for n in names)
    assert dict(net.named_modules())["vgg16/block5_conv3"] is transfer.get_layer("vgg16").get_layer("block5_conv3")
    assert net.cnnlens_layer_aliases["block5_conv3"] == "vgg16/block5_conv3"
    assert "head" not in net.cnnlens_layer_aliases  # already a path
    assert [p for p, _ in keras_layers(transfer)] == names[1:]
    assert len(list(net.parameters())) == len(transfer.weights)
    assert is_keras_model(transfer) and not is_keras_model(net) and not is_keras_model(torch.nn.Linear(1, 1))
    assert net.cnnlens_layout == "nhwc"


def _manual_gradcam(transfer: Any, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Signed Grad-CAM at vgg16/block5_conv3 computed by hand with Keras layers and torch autograd."""
    keras = sys.modules["keras"]
    base = transfer.get_layer("vgg16")
    upto = keras.Model(base.inputs, base.get_layer("block5_conv3").output)
    act = upto(x.permute(0, 2, 3, 1), training=False).detach().requires_grad_(True)  # (B, h, w, C)
    pooled = base.get_layer("block5_pool")(act)
    feats = pooled.mean(dim=(1, 2))
    head = transfer.get_layer("head")
    logits = feats @ head.kernel.value + head.bias.value
    (grad,) = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), act)
    weights = grad.mean(dim=(1, 2), keepdim=True)
    return (weights * act).sum(-1).detach()  # (B, h, w)


def test_gradcam_at_an_inner_layer_of_a_frozen_nested_base(transfer: Any) -> None:
    net = wrap_keras(transfer)
    x = _images(2, 64, 64, seed=3)
    before = _snapshot(transfer)
    ex = explain(net, x, methods="gradcam", layers="block5_conv3")[0]
    assert ex.layer == "vgg16/block5_conv3"
    assert ex.raw.shape == (2, 1, 4, 4) and ex.maps.shape == (2, 1, 64, 64)
    assert torch.isfinite(ex.maps).all()
    with torch.no_grad():
        cls = net(x).argmax(1)
    expected = _manual_gradcam(transfer, x, cls)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ex.raw[:, 0], expected, rtol=1e-4, atol=1e-6)
    after = _snapshot(transfer)
    assert all(np.array_equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1:] == after[1:] and not transfer.get_layer("vgg16").trainable
    assert _no_hooks(net)


def test_bare_and_path_names_give_the_same_maps(transfer: Any) -> None:
    net = wrap_keras(transfer)
    x = _images(1, 64, 64, seed=4)
    bare = explain(net, x, layers="block4_conv3")[0]
    path = explain(net, x, layers="vgg16/block4_conv3")[0]
    assert bare.layer == path.layer == "vgg16/block4_conv3"
    torch.testing.assert_close(bare.raw, path.raw)


def test_results_are_found_by_the_bare_name_too(transfer: Any) -> None:
    net = wrap_keras(transfer)
    result = explain(net, _images(1, 64, 64, seed=4), methods=["gradcam"], layers=["block4_conv3", "block5_pool"])
    assert result.layers == ["vgg16/block4_conv3", "vgg16/block5_pool"]
    assert result["gradcam", "block4_conv3"] is result["gradcam", "vgg16/block4_conv3"]
    with pytest.raises(LayerNotFoundError, match="block5_conv3"):
        result.get("gradcam", "block5_conv3")  # not computed: the error lists what was


def test_an_ambiguous_bare_name_is_refused_with_its_paths(keras: Any) -> None:
    """Two nested models with a layer of the same name: the bare name names neither; full paths work."""

    def branch(name: str) -> Any:
        return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, name="conv")], name=name)

    inp = keras.Input((8, 8, 3))
    merged = keras.layers.Concatenate(name="merge")([branch("left")(inp), branch("right")(inp)])
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(merged))
    net = wrap_keras(keras.Model(inp, out))
    assert net.cnnlens_layer_ambiguous == {"conv": ["left/conv", "right/conv"]}
    with pytest.raises(LayerNotFoundError, match=r"'conv' is ambiguous .*'left/conv', 'right/conv'"):
        explain(net, _images(1, 8, 8), layers="conv")
    result = explain(net, _images(1, 8, 8), methods=["gradcam"], layers=["left/conv", "right/conv"])
    with pytest.raises(LayerNotFoundError, match="ambiguous"):
        result.get("gradcam", "conv")
    assert result["gradcam", "right/conv"].layer == "right/conv"


def test_did_you_mean_on_keras_names(transfer: Any) -> None:
    net = wrap_keras(transfer)
    with pytest.raises(LayerNotFoundError, match="block5_conv3"):
        explain(net, _images(1, 64, 64), layers="block5_conv4")


def test_weights_flags_and_hooks_unchanged_after_an_exception(transfer: Any) -> None:
    net = wrap_keras(transfer)
    before = _snapshot(transfer)

    def broken(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("selector failed")

    with pytest.raises(RuntimeError, match="selector failed"):
        explain(net, _images(1, 64, 64), layers="block5_conv3", output_selector=broken)
    after = _snapshot(transfer)
    assert all(np.array_equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1:] == after[1:]
    assert _no_hooks(net)


def test_sequential_softmax_layer_and_nhwc_layout(sequential: Any) -> None:
    net = wrap_keras(sequential)
    assert "'probs'" in net.logits_from
    x = _images(2, 16, 12, seed=5)
    with torch.no_grad():
        logits = net(x)
        probs = sequential(x.permute(0, 2, 3, 1), training=False)
    torch.testing.assert_close(torch.softmax(logits, -1), probs)
    ex = explain(net, x, layers="conv")[0]
    # (B, 14, 10, 4) NHWC read as (B, C=4, 14, 10): a channels-first misreading would give (.., 10, 4)
    assert ex.raw.shape == (2, 1, 14, 10)
    assert torch.isfinite(ex.maps).all()


def test_subclassed_model(keras: Any) -> None:
    class Block(keras.layers.Layer):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="block")
            self.inner = keras.layers.Conv2D(3, 1, name="inner")

        def call(self, x: Any) -> Any:
            return x + self.inner(x)

    class Small(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(name="small")
            self.conv = keras.layers.Conv2D(3, 3, padding="same", name="conv")
            self.block = Block()
            self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
            self.fc = keras.layers.Dense(4, name="fc")

        def call(self, x: Any, training: bool = False) -> Any:
            return self.fc(self.pool(self.block(self.conv(x))))

    keras.utils.set_random_seed(6)
    model = Small()
    model(np.zeros((1, 8, 8, 3), dtype="float32"))
    net = wrap_keras(model)
    assert "subclassed" in net.logits_from
    assert {"conv", "block", "block/inner", "pool", "fc"} <= {n for n, _ in net.named_modules()}
    x = _images(2, 8, 8, seed=7)
    ex = explain(net, x, layers="conv")[0]
    assert ex.raw.shape == (2, 1, 8, 8) and torch.isfinite(ex.maps).all()
    inner = explain(net, x, layers="inner")[0]  # a custom layer's sublayer, by its bare name
    assert inner.layer == "block/inner" and torch.isfinite(inner.maps).all()
    assert _no_hooks(net)


def test_kernel_oihw_matches_the_keras_convolution(sequential: Any) -> None:
    conv = sequential.get_layer("conv")
    kernel = kernel_oihw(conv)
    assert kernel is not None and kernel.shape == (4, 3, 3, 3)
    x = _images(1, 16, 12, seed=8)
    expected = conv(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    got = F.conv2d(x, kernel, torch.as_tensor(conv.bias.value))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    assert kernel_oihw(sequential.get_layer("dense")) is None


def test_keras_file_round_trip_gives_identical_maps(transfer: Any, tmp_path: Any) -> None:
    path = tmp_path / "transfer.keras"
    transfer.save(path)
    loaded = load_model(str(path))
    assert isinstance(loaded.module, KerasModule) and loaded.module.keras_model is not transfer
    assert loaded.spec.num_classes == 5 and loaded.spec.source == "keras" and not loaded.random_weights
    assert loaded.spec.preprocessing.input_size == (64, 64)
    assert loaded.spec.default_layer == "vgg16/block5_conv3"
    x = _images(2, 64, 64, seed=9)
    a = explain(wrap_keras(transfer), x, layers="block5_conv3")[0]
    b = explain(loaded, x, layers="block5_conv3")[0]
    torch.testing.assert_close(a.raw, b.raw, rtol=0, atol=0)
    torch.testing.assert_close(a.maps, b.maps, rtol=0, atol=0)


def test_weights_file_alone_is_refused_as_a_model(sequential: Any, tmp_path: Any) -> None:
    path = tmp_path / "seq.weights.h5"
    sequential.save_weights(path)
    with pytest.raises(WeightsMismatchError, match="weights="):
        load_model(str(path))


def test_full_vgg16_224(vgg224: Any) -> None:
    net = vgg224.module
    assert isinstance(net, KerasModule) and vgg224.random_weights and "RANDOM" in vgg224.weights_source
    spec = vgg224.spec
    assert (spec.name, spec.default_layer, spec.num_classes) == ("keras:vgg16", "block5_conv3", 1000)
    assert spec.preprocessing.mode == "caffe" and spec.preprocessing.input_size == (224, 224)
    assert vgg224.class_names[:2] == ["tench", "goldfish"]
    x = _images(1, 224, 224, seed=10)
    with torch.no_grad():
        logits = net(x)
        direct = net.keras_model(x.permute(0, 2, 3, 1), training=False)
    torch.testing.assert_close(logits, direct, rtol=0, atol=0)  # built with classifier_activation=None
    ex = explain(vgg224, x, layers=spec.default_layer)[0]
    assert ex.raw.shape == (1, 1, 14, 14) and torch.isfinite(ex.maps).all()


def test_published_weights_refused_offline(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="--random-weights"):
        load_keras("keras:resnet50")
    with pytest.raises(ModelTypeError):
        wrap_keras(torch.nn.Linear(2, 2))
    with pytest.raises(ModelConfigError, match="torch device"):
        load_keras("keras:vgg16", random_weights=True, device="nowhere")


def test_wrong_backend_is_refused(keras: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(KerasBackendError, match="KERAS_BACKEND=torch") as info:
        import_keras()
    assert "already imported" in str(info.value) and "new Python process" in str(info.value)


def test_core_imports_no_keras() -> None:
    code = (
        "import sys, cnnlens\n"
        "from cnnlens.models import load_model\n"
        "from cnnlens import explain\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
        "assert 'cnnlens.models.keras' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_declared_layout_is_authoritative(sequential: Any) -> None:
    from cnnlens.capture.geometry import detect_4d

    net = wrap_keras(sequential)
    conv = dict(net.named_modules())["conv"]
    # a square output with as many channels as pixels per side: the shape alone reads it channels-first
    assert detect_4d(torch.nn.Identity(), conv, (1, 16, 16, 16), (16, 16))[0] == "nchw"
    kind, why = detect_4d(net, conv, (1, 16, 16, 16), (16, 16))
    assert kind == "nhwc" and "KerasModule" in why


def test_legacy_h5_full_model_round_trip(sequential: Any, tmp_path: Any) -> None:
    path = tmp_path / "seq.h5"
    sequential.save(path)
    loaded = load_model(str(path), class_names=["a", "b", "c"])
    assert loaded.class_names == ["a", "b", "c"] and loaded.spec.num_classes == 3
    assert loaded.spec.default_layer == "relu"  # the last non-pooling layer with a 4-D output
    x = _images(2, 16, 12, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), wrap_keras(sequential)(x), rtol=0, atol=0)


def test_damaged_cached_weights_are_refused_clearly(keras: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5").write_bytes(b"not an h5 file")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="delete it and pass --download"):
        load_keras("keras:resnet50")


@pytest.mark.slow
def test_cached_published_weights_are_used_without_network(
    keras: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(12)
    source = keras.applications.ResNet50(weights=None, classifier_activation=None)
    (tmp_path / "models").mkdir()
    with h5py.File(tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)  # the published files' (legacy) format
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    loaded = load_keras("keras:resnet50")
    assert not loaded.random_weights and "published" in loaded.weights_source
    x = _images(1, 224, 224, seed=13)
    with torch.no_grad():
        expected = source(x.permute(0, 2, 3, 1), training=False)
        torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=0)


def test_another_backend_in_the_environment_is_refused_before_importing(
    keras: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "keras")  # as in a fresh process (restored afterwards)
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(KerasBackendError, match="KERAS_BACKEND='tensorflow' is set"):
        import_keras()
    assert "keras" not in sys.modules and "tensorflow" not in sys.modules


def test_a_softmax_inside_a_nested_last_model_gives_its_pre_softmax_logits(keras: Any) -> None:
    """A classifier built as its own model and called last: the logits are its pre-softmax, as in the flat case."""
    inner = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax", name="probs")],
        name="seq",
    )
    inp = keras.Input((8, 8, 3))
    direct = keras.Model(inp, inner(inp), name="outer")  # the nested model takes the outer input itself
    inp2 = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", name="pre")
    prefixed = keras.Model(inp2, inner(conv(inp2)), name="outer2")  # the same classifier after a conv
    x = _images(2, 8, 8)
    dense = inner.get_layer("probs")
    kernel, bias = torch.as_tensor(dense.kernel.value), torch.as_tensor(dense.bias.value)
    for model, features in ((direct, lambda h: h), (prefixed, lambda h: torch.as_tensor(conv(h)))):
        net = wrap_keras(model)
        assert net.logits_from == "pre-softmax of the final Dense 'probs' inside the nested model 'seq'"
        with torch.no_grad():
            logits = net(x)
            nhwc = x.permute(0, 2, 3, 1)
            expected = features(nhwc).reshape(2, -1) @ kernel + bias  # the Dense's pre-activation, by hand
            probabilities = torch.as_tensor(model(nhwc, training=False))
        assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(torch.softmax(logits, dim=1), probabilities, atol=1e-6)
    assert wrap_keras(inner).logits_from == "pre-softmax of the final Dense 'probs'"
