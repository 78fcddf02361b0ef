"""The command line on token models (issue 11): defaults with no --layer/--layout, --layout checks, printed layouts.

Models come from timm/torchvision names with --random-weights (offline, timm's/torchvision's preprocessing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlens.cli import common, main
from cnnlens.cli.args import parse_layout_args
from cnnlens.errors import UsageError


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((180, 240, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _explain(image: Path, out: Path, model: str, *extra: str) -> int:
    argv = ["explain", str(image), "--model", model, "--random-weights", "--method", "gradcam"]
    return main([*argv, "--show-top", "1", "--out", str(out), *extra])


@pytest.mark.parametrize(
    ("model", "layer", "printed"),
    [
        ("vit_tiny_patch16_224", "blocks.11.norm1", "tokens: 1 prefix token + 14x14 grid (timm num_prefix_tokens=1"),
        ("deit_tiny_distilled_patch16_224", "blocks.11.norm1", "tokens: 2 prefix tokens + 14x14 grid"),
        ("swin_tiny_patch4_window7_224", "layers.3.blocks.1.norm1", "nhwc"),
        ("convnext_tiny", "features", "nchw"),
    ],
)
def test_explain_needs_no_layer_or_layout_and_prints_what_it_inferred(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, layer: str, printed: str
) -> None:
    out = tmp_path / "out"
    assert _explain(image, out, model) == 0
    captured = capsys.readouterr()
    assert f"layer {layer} (default layer): {printed}" in captured.out
    assert "RANDOM WEIGHTS" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["results"]
    assert entry["layer"] == layer
    raw = np.load(out / entry["files"]["raw"])
    assert raw.shape == ((7, 7) if model.startswith(("swin", "convnext")) else (14, 14)) and np.isfinite(raw).all()
    assert Image.open(out / entry["files"]["overlay"]).size == (224, 224)
    if model.startswith("vit"):  # timm's pretrained_cfg preprocessing, offline with random weights
        prep = manifest["model"]["preprocessing"]
        assert (prep["mean"], prep["interpolation"], prep["resize"]) == ([0.5] * 3, "bicubic", 248)


def test_input_size_resizes_a_timm_vit_and_the_grid_follows(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: timm's patch embedding asserted 224x224 (a traceback); now set_input_size, and a 10x15 grid
    out = tmp_path / "o"
    assert _explain(image, out, "deit_tiny_distilled_patch16_224", "--input-size", "160", "240") == 0
    captured = capsys.readouterr()
    assert "now takes 160x240" in captured.err
    assert "layer blocks.11.norm1 (default layer): tokens: 2 prefix tokens + 10x15 grid" in captured.out
    (entry,) = json.loads((out / "manifest.json").read_text())["results"]
    assert np.load(out / entry["files"]["raw"]).shape == (10, 15)


def test_a_layout_given_per_layer_is_used_and_printed(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = ["--layer", "blocks.10.norm2", "blocks.11.norm1"]
    assert _explain(image, tmp_path / "o", "vit_tiny_patch16_224", *layers, "--layout", "blocks.11.norm1=tokens:1") == 0
    out = capsys.readouterr().out
    assert "layer blocks.11.norm1: tokens: 1 prefix token + 14x14 grid (explicit" in out
    assert "layer blocks.10.norm2: tokens: 1 prefix token + 14x14 grid (timm" in out  # the other one inferred


def test_a_layout_that_does_not_fit_exits_2_with_the_layout_error(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _explain(image, tmp_path / "o", "vit_tiny_patch16_224", "--layout", "tokens:1:7x7") == 2
    err = capsys.readouterr().err
    assert "197 tokens" in err and "7x7 grid" in err and "--layout tokens:P:HxW" in err


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (["bogus"], "unknown layout 'bogus'"),
        (["tokens:1:0x14"], "grid"),
        (["blocks.11.norm1="], "is not LAYER=SPEC"),
        (["nhwc", "blocks.1=nchw"], "either one SPEC for every layer or LAYER=SPEC"),
        (["a=nchw", "a=nhwc"], "two layouts"),
    ],
)
def test_bad_layouts_exit_2_before_the_model_loads(
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    layout: list[str],
    message: str,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before --layout was checked")

    monkeypatch.setattr(common, "load_model", never)
    flags = [item for spec in layout for item in ("--layout", spec)]
    for command in ("explain", "compare-layers"):
        argv = [command, str(image), "--model", "vit_tiny_patch16_224", "--random-weights", *flags]
        assert main([*argv, "--out", str(tmp_path / command)]) == 2
        assert message in capsys.readouterr().err


def test_parse_layout_args_forms() -> None:
    assert parse_layout_args([]) is None
    assert parse_layout_args(["tokens:2"]) == "tokens:2"
    assert parse_layout_args(["x=nhwc", "y = tokens:1:14x14"]) == {"x": "nhwc", "y": "tokens:1:14x14"}
    with pytest.raises(UsageError, match="--layout 'tokens:a'"):
        parse_layout_args(["tokens:a"])


def test_layers_lists_token_roles_with_their_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--model", "vit_tiny_patch16_224", "--random-weights"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "blocks.11.norm1 *" in line)
    assert "tokens:1:14x14 (192x14x14)" in row and "attention_norm" in row and "final_spatial" in row
    assert any("blocks.11.norm2" in line and "mlp_norm" in line for line in out.splitlines())


def test_compare_layers_on_vit_blocks(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare-layers", str(image), "--model", "vit_tiny_patch16_224", "--random-weights"]
    argv += ["--layer", "blocks.11.norm1", "blocks.11.norm2", "--method", "gradcam", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "study")]) == 0
    out = capsys.readouterr().out
    assert "layer blocks.11.norm1: tokens: 1 prefix token + 14x14 grid" in out
    assert "attention_norm" in out and "mlp_norm" in out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-class image-folder dataset and its class-names file (the model is built with 2 classes)."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (root / "data" / label).mkdir(parents=True)
        Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(root / "data" / label / "a.png")
    names = root / "names.txt"
    names.write_text("cat\ndog\n")
    return root / "data", names


def test_layout_checks_run_before_the_model_loads_on_every_command(
    image: Path,
    dataset: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before --layout was checked")

    monkeypatch.setattr(common, "load_model", never)
    model = ["--model", "vit_tiny_patch16_224", "--random-weights"]
    argvs = {
        "features": ["features", str(image), *model, "--layout", "tokens:1:0x14"],
        "run": ["run", str(dataset[0]), *model, "--num-classes", "2", "--layout", "blocks.11.norm1=tokens:x"],
    }
    for command, argv in argvs.items():
        assert main([*argv, "--out", str(tmp_path / command)]) == 2, command
        assert "--layout" in capsys.readouterr().err
    models = ["compare-models", str(image), "--models", "vit_tiny_patch16_224", "--random-weights"]
    assert main([*models, "--layout", "vit_tiny_patch16_224=tokens:x", "--out", str(tmp_path / "cm1")]) == 2
    assert "--layout vit_tiny_patch16_224=tokens:x" in capsys.readouterr().err
    assert main([*models, "--layout", "resnet50=tokens:1", "--out", str(tmp_path / "cm2")]) == 2
    assert "'resnet50' is not one of --models" in capsys.readouterr().err
    assert main([*models, "--layout", "tokens:1", "--out", str(tmp_path / "cm3")]) == 2
    assert "is not MODEL=VALUE" in capsys.readouterr().err


def test_run_takes_a_layout_and_keeps_it_in_its_fingerprint(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, names = dataset
    argv = ["run", str(data), "--model", "vit_tiny_patch16_224", "--random-weights", "--num-classes", "2"]
    argv += ["--class-names", str(names), "--method", "gradcam", "--no-overlays", "--out", str(tmp_path / "run")]
    assert main([*argv, "--layout", "blocks.11.norm1=tokens:1:14x14"]) == 0
    settings = json.loads((tmp_path / "run" / "run.json").read_text())
    assert json.dumps({"layout": {"blocks.11.norm1": "tokens:1:14x14"}})[1:-1] in json.dumps(settings)
    # A layout that does not fit the layer fails on the first batch: every image becomes an error row or the
    # run stops with the layout error, but never a silently wrong map.
    bad = [*argv[:-1], str(tmp_path / "run-bad"), "--layout", "blocks.11.norm1=tokens:1:10x10"]
    assert main(bad) != 0


def test_features_and_compare_models_use_a_given_layout(image: Path, tmp_path: Path) -> None:
    from cnnlens.errors import LayoutError
    from cnnlens.models import load_model
    from cnnlens.studies import compare_models
    from cnnlens.views.features import feature_maps

    model = load_model("vit_tiny_patch16_224", random_weights=True)
    picture = np.asarray(Image.open(image).convert("RGB"))
    fm = feature_maps(model, picture, "blocks.11.norm1", layout="tokens:1:14x14", top_k=3)
    assert fm["blocks.11.norm1"].maps.shape == (3, 14, 14)
    with pytest.raises(LayoutError, match=r"given layout has 1 prefix token\(s\) and a 10x10 grid"):
        feature_maps(model, picture, "blocks.11.norm1", layout="tokens:1:10x10")
    with pytest.raises(LayoutError, match="10x10 grid"):
        compare_models(
            [model], [picture], methods=["gradcam"], layers={model.spec.name: "blocks.11.norm1"}, steps=2,
            layouts={model.spec.name: "tokens:1:10x10"},
        )  # fmt: skip
    with pytest.raises(Exception, match="not among the compared models"):
        compare_models([model], [picture], layouts={"resnet50": "nchw"})


def test_a_read_only_array_from_pil_preprocesses_without_a_warning(image: Path) -> None:
    import warnings

    from cnnlens.models import load_model

    picture = np.asarray(Image.open(image).convert("RGB"))
    assert not picture.flags.writeable
    prep = load_model("efficientnet_lite0").spec.preprocessing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = prep.to_tensor(picture)
    assert x.shape == (3, 224, 224) and torch_finite(x)


def torch_finite(x: object) -> bool:
    import torch

    assert isinstance(x, torch.Tensor)
    return bool(torch.isfinite(x).all())
