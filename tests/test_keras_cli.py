"""The ``cnnlens`` commands on Keras models (issue 12), through :func:`cnnlens.cli.main`.

``explain --model keras:vgg16 --random-weights --layer block5_conv3`` runs as the issue states it (one 224 px
VGG16); every other command runs on one small saved ``.keras`` file (a 64x64 VGG16 base with a softmax head,
written by the module fixture), and ``compare-models`` mixes it with an untrained torch model. The four
``keras:`` architectures in one ``compare-models`` are run by hand (minutes on two cores), not here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnlens.cli import main
from cnnlens.data import write_sample_images

if importlib.util.find_spec("keras") is None:  # not imported here: the backend is chosen by cnnlens
    pytest.skip("Keras models need keras 3 (pip install 'cnnlens[keras]')", allow_module_level=True)

from cnnlens.models.keras import import_keras


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_sample_images(folder, ["chelsea"])
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transfer-learning model saved as .keras: a 64x64 VGG16 base (nested) and a 3-class softmax head."""
    keras = import_keras()
    keras.utils.set_random_seed(5)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
    inp = keras.Input((64, 64, 3))
    y = keras.layers.GlobalAveragePooling2D(name="gap")(base(inp))
    out = keras.layers.Dense(3, activation="softmax", name="head")(y)
    path = tmp_path_factory.mktemp("keras") / "transfer.keras"
    keras.Model(inp, out, name="transfer").save(path)
    return path


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_explain_keras_vgg16_at_block5_conv3(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vgg"
    argv = ["explain", str(photos / "chelsea.png"), "--model", "keras:vgg16", "--random-weights"]
    assert main([*argv, "--layer", "block5_conv3", "--method", "gradcam", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("RANDOM WEIGHTS") == 1  # the banner says it once
    assert "RANDOM WEIGHTS (seed 0) - not a trained model" in captured.err
    assert "layer block5_conv3: nhwc" in captured.out  # how the channels-last output was read
    manifest = _manifest(out)
    assert manifest["versions"]["keras_backend"] == "torch" and manifest["versions"]["keras"].startswith("3.")
    assert manifest["model"]["name"] == "keras:vgg16" and manifest["model"]["random_weights"] is True
    assert manifest["model"]["preprocessing"]["mode"] == "caffe"
    (result,) = manifest["results"]
    assert result["layer"] == "block5_conv3"
    raw = np.load(out / result["files"]["raw"])
    assert raw.shape == (14, 14) and np.isfinite(raw).all()


def test_explain_a_saved_keras_file_by_bare_layer_name(
    photos: Path, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "file"
    argv = ["explain", str(photos / "chelsea.png"), "--model", str(saved), "--method", "gradcam", "gradcampp"]
    assert main([*argv, "--layer", "block5_conv3", "--out", str(out)]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().err  # a saved model has its own weights
    manifest = _manifest(out)
    assert manifest["model"]["random_weights"] is False
    assert {r["method"] for r in manifest["results"]} == {"gradcam", "gradcampp"}
    for r in manifest["results"]:
        assert r["layer"] in ("block5_conv3", "vgg16/block5_conv3")
        assert np.load(out / r["files"]["raw"]).shape == (4, 4)
    # a Keras model built for 64x64 takes no other size: a usage error that says so, before any work
    bad = main([*argv, "--input-size", "32", "--out", str(tmp_path / "bad")])
    assert bad == 2
    assert "built for 64x64" in capsys.readouterr().err


def test_layers_lists_keras_roles_and_parameters(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--model", str(saved)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.count("│") > 5]
    rows = {line.split("│")[1].strip().removesuffix(" *"): line for line in lines}
    assert any(line.split("│")[1].strip() == "vgg16/block5_conv3 *" for line in lines)  # the default layer
    assert "highest_numbered_conv" in rows["vgg16/block5_conv3"]
    assert "nhwc (512x4x4)" in rows["vgg16/block5_conv3"]  # the (C, h, w) map view of a 4x4x512 output
    assert "1,792" in rows["vgg16/block1_conv1"]  # 3 * 3 * 3 * 64 + 64, counted by Keras
    assert "block_output" in rows["vgg16/block4_pool"]
    assert "final_spatial" in rows["vgg16/block5_pool"]


def test_models_lists_the_keras_architectures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, layer in (("vgg16", "block5_conv3"), ("inception_resnet_v2", "conv_7b_ac")):
        row = next(line for line in out.splitlines() if f"keras:{name} " in line)
        assert layer in row


def test_views_commands_on_a_keras_file(photos: Path, saved: Path, tmp_path: Path) -> None:
    model = ["--model", str(saved)]
    out = tmp_path / "filters"
    assert main(["filters", *model, "--top-k", "8", "--out", str(out)]) == 0
    assert any(out.rglob("*.png"))
    out = tmp_path / "features"
    argv = ["features", str(photos / "chelsea.png"), *model, "--layer", "block5_conv3", "--top-k", "4"]
    assert main([*argv, "--no-individual", "--out", str(out)]) == 0
    assert any(out.rglob("*.png"))
    out = tmp_path / "maximize"
    argv = ["maximize", *model, "--layer", "block4_conv1", "--channels", "0-1", "--steps", "2", "--size", "48"]
    assert main([*argv, "--threads", "1", "--out", str(out)]) == 0
    assert any(out.rglob("*.png"))


def test_explain_keras_architecture_with_input_size_and_preprocess(photos: Path, tmp_path: Path) -> None:
    """``--preprocess`` reaches a ``keras:`` architecture built at ``--input-size`` (it was once read as a factory)."""
    out = tmp_path / "vgg32"
    argv = ["explain", str(photos / "chelsea.png"), "--model", "keras:vgg16", "--random-weights", "--method", "gradcam"]
    assert main([*argv, "--input-size", "32", "--preprocess", "tf", "--out", str(out)]) == 0
    prep = _manifest(out)["model"]["preprocessing"]
    assert prep["mode"] == "tf" and prep["input_size"] == [32, 32] and prep["mean"] == [0.5, 0.5, 0.5]


def test_compare_layers_on_a_keras_file(photos: Path, saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "layers"
    argv = ["compare-layers", str(photos), "--model", str(saved), "--method", "gradcam", "--steps", "2"]
    assert main([*argv, "--layer", "block5_conv3", "block5_pool", "--out", str(out)]) == 0  # bare Keras names
    html = (out / "index.html").read_text()
    assert "block5_conv3" in html and "block5_pool" in html


def test_compare_models_mixes_keras_and_torch(
    photos: Path, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A saved Keras model and an untrained torch model in one report; --random-weights is for the torch one."""
    out = tmp_path / "models"
    argv = ["compare-models", str(photos), "--models", str(saved), "resnet18", "--random-weights"]
    argv += ["--input-size", "resnet18=96x64", "--preprocess", f"{saved}=caffe"]  # per model
    assert main([*argv, "--method", "gradcam", "--steps", "2", "--last-n", "1", "--out", str(out)]) == 0
    study = json.loads((out / "study.json").read_text())
    prep = {Path(m["name"]).name: m["preprocessing"] for m in study["models"]}
    assert prep["resnet18"]["input_size"] == [96, 64] and "mode" not in prep["resnet18"]
    assert prep[saved.name]["mode"] == "caffe" and prep[saved.name]["input_size"] == [64, 64]
    captured = capsys.readouterr()
    assert "resnet18 (RANDOM)" in captured.out and f"{saved} (RANDOM)" not in captured.out
    html = (out / "index.html").read_text()
    assert "resnet18" in html and saved.name in html and "RANDOM" in html
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert all(":" not in f and "/" not in f for f in files), files  # model names made file-safe
    for src in re.findall(r'src="([^"]+)"', html):
        assert (out / src).is_file()


def test_run_on_a_keras_file(photos: Path, saved: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    for k in (0, 2):  # the saved model's classes are class_0..class_2
        (dataset / f"class_{k}").mkdir(parents=True)
        (dataset / f"class_{k}" / "chelsea.png").write_bytes((photos / "chelsea.png").read_bytes())
    out = tmp_path / "run"
    argv = ["run", str(dataset), "--model", str(saved), "--method", "gradcam", "--workers", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == summary["ok"] == 2 and summary["errors"] == 0
    caffe = tmp_path / "run-caffe"  # --preprocess: another normalisation, hence another run (fingerprint)
    assert main([*argv, "--preprocess", "caffe", "--out", str(caffe)]) == 0
    assert _manifest(caffe)["model"]["preprocessing"]["mode"] == "caffe"
    assert _manifest(out)["model"]["preprocessing"]["mode"] == "tf"  # a .keras file's default
    fingerprints = {json.loads((d / "run.json").read_text())["fingerprint"] for d in (out, caffe)}
    assert len(fingerprints) == 2
    assert list(summary["metrics"]) == ["gradcam/vgg16/block5_conv3"]  # the file's default layer
    assert (out / "results.parquet").is_file()
    assert main([*argv, "--out", str(out)]) == 0  # resumed: same fingerprint (the Keras weights hash alike)
    assert json.loads((out / "summary.json").read_text())["skipped"] == 2


def test_keras_architecture_at_another_input_size(photos: Path, tmp_path: Path) -> None:
    """--input-size builds keras:vgg16 for that size (random weights), its maps at that resolution."""
    out = tmp_path / "vgg64"
    argv = ["explain", str(photos / "chelsea.png"), "--model", "keras:vgg16", "--random-weights", "--method", "gradcam"]
    assert main([*argv, "--input-size", "64", "--layer", "block5_conv3", "--out", str(out)]) == 0
    manifest = _manifest(out)
    assert manifest["model"]["preprocessing"]["input_size"] == [64, 64]
    assert manifest["model"]["preprocessing"]["mode"] == "caffe"
    assert np.load(out / manifest["results"][0]["files"]["raw"]).shape == (4, 4)  # block5_conv3 is 1/16 of the input


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--input-size", "64"], "builds only at 224x224"),  # the published weights include the classifier
        (["--input-size", "16", "--random-weights"], "at least 32x32"),
        (["--preprocess", "bgr"], "invalid choice"),
    ],
)
def test_keras_input_size_and_preprocess_refusals(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], said: str
) -> None:
    argv = ["explain", str(photos / "chelsea.png"), "--model", "keras:vgg16", *extra, "--out", str(tmp_path / "x")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage error
        code = int(exc.code or 0)
    assert code == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_preprocess_mode_of_a_saved_keras_file(
    photos: Path, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "caffe"
    argv = ["explain", str(photos / "chelsea.png"), "--model", str(saved), "--method", "gradcam"]
    assert main([*argv, "--preprocess", "caffe", "--out", str(out)]) == 0
    assert _manifest(out)["model"]["preprocessing"]["mode"] == "caffe"  # BGR, minus the ImageNet mean
    # --preprocess is for Keras models: refused on a torch model before it is loaded
    bad = ["explain", str(photos / "chelsea.png"), "--model", "resnet18", "--random-weights", "--preprocess", "tf"]
    assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
    assert "applies to Keras models" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two cheap saved Keras classifiers (32x32): a plain conv stack and a residual one with a frozen nested block."""
    keras = import_keras()
    layers = keras.layers
    keras.utils.set_random_seed(11)
    folder = tmp_path_factory.mktemp("small")
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv1")(inp)
    x = layers.MaxPooling2D(name="block1_pool")(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="block2_conv1")(x)
    out = layers.Dense(4, activation="softmax", name="predictions")(layers.GlobalAveragePooling2D()(x))
    plain = folder / "plain.keras"
    keras.Model(inp, out, name="plain").save(plain)
    block_in = keras.Input((16, 16, 8))
    y = layers.Conv2D(8, 3, padding="same", activation="relu", name="res_conv")(block_in)
    block = keras.Model(block_in, layers.Add(name="res_add")([block_in, y]), name="block")
    block.trainable = False
    inp = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inp)
    x = layers.ReLU(name="res_out")(block(x))
    out = layers.Dense(4, activation="softmax", name="predictions")(layers.GlobalAveragePooling2D()(x))
    residual = folder / "residual.keras"
    keras.Model(inp, out, name="residual").save(residual)
    return [plain, residual]


def test_compare_models_on_two_keras_models(
    photos: Path, small_models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed's part 2 on Keras models only: every model at its recommended layer, one report."""
    out = tmp_path / "models"
    names = [str(p) for p in small_models]
    argv = ["compare-models", str(photos), "--models", *names, "--method", "gradcam", "gradcampp", "--steps", "4"]
    assert main([*argv, "--last-n", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    html = (out / "index.html").read_text()
    for path in small_models:
        assert path.name in html and str(path) in printed
    study = json.loads((out / "study.json").read_text())
    assert [Path(m["name"]).name for m in study["models"]] == ["plain.keras", "residual.keras"]
    assert study["versions"]["keras_backend"] == "torch"
    rows = [(Path(r["model"]).name, r["method"], r["layer"]) for r in study["model_study"]]
    assert [row[:2] for row in rows] == [
        (name, method) for name in ("plain.keras", "residual.keras") for method in ("gradcam", "gradcampp")
    ]
    plain_layers = {"block1_conv1", "block1_pool", "block2_conv1"}
    residual_layers = {"stem", "block/res_conv", "block/res_add", "res_out"}  # the nested block by its path
    assert all(layer in (plain_layers if name == "plain.keras" else residual_layers) for name, _, layer in rows)
    for src in re.findall(r'src="([^"]+)"', html):
        assert (out / src).is_file()
