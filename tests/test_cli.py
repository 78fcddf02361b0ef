"""End-to-end CLI tests: every command in a temporary directory, on the embedded model (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlens.cli import main, resolve_class
from cnnlens.data import write_sample_images
from cnnlens.errors import TargetError


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_sample_images(folder, ["chelsea", "coffee"])
    return folder


def test_explain_writes_what_it_promises(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = photos.parent / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(photos),
            str(bad),
            "--method",
            "gradcam",
            "gradcampp",
            "--out",
            str(out),
            "--top-k",
            "3",
        ]
    )
    assert code == 1  # one input failed, the others were explained
    captured = capsys.readouterr()
    assert "espresso" in captured.out and "broken.jpg" in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == "efficientnet_lite0"
    assert not manifest["model"]["random_weights"]
    assert {r["method"] for r in manifest["results"]} == {"gradcam", "gradcampp"}
    assert {r["image"] for r in manifest["results"]} == {"chelsea", "coffee"}
    assert len(manifest["failures"]) == 1 and manifest["failures"][0]["path"].endswith("broken.jpg")
    for r in manifest["results"]:
        assert r["layer"] == "bn2" and not r["degenerate"]
        for rel in r["files"].values():
            assert (out / rel).is_file()
        raw = np.load(out / r["files"]["raw"])
        assert raw.shape == (7, 7) and np.isfinite(raw).all()
        overlay = Image.open(out / r["files"]["overlay"])
        assert overlay.size == (224, 224)
        assert overlay.text.get("cnnlens:model") == "efficientnet_lite0"
    coffee = next(p for p in manifest["predictions"] if p["image"] == "coffee")
    assert coffee["top"][0]["name"] == "espresso" and len(coffee["top"]) == 3
    html = (out / "index.html").read_text()
    assert "broken.jpg" in html and "Grad-CAM++" in html
    for src in __import__("re").findall(r'src="([^"]+)"', html):
        assert (out / src).is_file()


def test_explain_class_by_name_options_and_top(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    code = main(
        [
            "explain", str(photos / "chelsea.png"), "--class", "tabby", "--layer", "bn2", "blocks.5.0.bn1",
            "--method", "gradcampp", "--option", "gradcampp.alpha_normalize=true", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["target_class"] for r in manifest["results"]} == {281}
    assert {r["layer"] for r in manifest["results"]} == {"bn2", "blocks.5.0.bn1"}
    assert all(r["variant"]["alpha_normalize"] is True for r in manifest["results"])
    out2 = tmp_path / "o2"
    assert (
        main(
            [
                "explain",
                str(photos / "coffee.png"),
                "--explain-top",
                "2",
                "--method",
                "gradcam",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert len(manifest["results"]) == 2 and manifest["results"][0]["target_class"] == 967


def test_usage_errors_are_one_clear_line(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(photos), "--layer", "bn3", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()
    assert main(["explain", str(photos), "--method", "gradcamm", "--out", str(tmp_path / "x")]) == 2
    assert "gradcam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain"])


def test_zoo_model_without_cached_weights_is_refused(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty torch cache: resnet50's published weights are not here, so the command refuses (exit 2) with the
    # fix, never explaining a silently random model.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))
    out = tmp_path / "x"
    assert main(["explain", str(photos), "--model", "resnet50", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "resnet50" in err and str(tmp_path / "empty-torch-cache") in err
    assert "--download" in err and "--weights" in err
    assert not out.exists() or not any(out.rglob("*.png"))


def test_random_weights_are_marked(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    code = main(
        [
            "explain",
            str(photos / "chelsea.png"),
            "--model",
            "resnet18",
            "--num-classes",
            "4",
            "--random-weights",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["random_weights"] is True
    assert "RANDOM WEIGHTS" in (out / "index.html").read_text()
    overlay = next(out.rglob("*.overlay.png"))
    assert "RANDOM" in Image.open(overlay).text.get("cnnlens:warning", "")


def test_listing_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "inception_resnet_v2" in out
    assert main(["methods"]) == 0
    assert "gradcampp" in capsys.readouterr().out
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert "bn2" in out and "1280x7x7" in out and "32" in out


def test_demo_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str((out / "index.html").resolve()) in printed.replace("\n", "")
    manifest = json.loads((out / "explain" / "manifest.json").read_text())
    assert len(manifest["predictions"]) == 3  # --quick explains the first three photos
    chelsea = next(p for p in manifest["predictions"] if p["image"] == "chelsea")
    assert {t["class"] for t in chelsea["top"][:3]} == {281, 282, 285}
    study = json.loads((out / "study.json").read_text())
    assert set(study["layer_studies"]["efficientnet_lite0"]["recommended"]) == {"gradcam", "gradcampp"}
    assert {r["model"] for r in study["model_study"]} == {"efficientnet_lite0", "efficientnet_lite1"}
    html = (out / "index.html").read_text()
    assert "Part 1" in html and "Target layers" in html and "Models, each at its best layer" in html
    for src in __import__("re").findall(r'src="([^"]+)"', html):
        assert (out / src).is_file(), src


def test_resolve_class() -> None:
    names = ["tabby", "tiger cat", "Egyptian cat", "tiger"]
    assert resolve_class("2", names) == 2
    assert resolve_class("TIGER", names) == 3
    assert resolve_class("egypt", names) == 2
    with pytest.raises(TargetError, match="several"):
        resolve_class("cat", names)
    with pytest.raises(TargetError, match="out of range"):
        resolve_class("9", names)
    with pytest.raises(TargetError, match="Did you mean"):
        resolve_class("tabbby", names)


def test_methods_doc_is_generated_from_the_registry() -> None:
    from cnnlens.methods import method_ids
    from cnnlens.report.methods_doc import methods_markdown

    text = methods_markdown()
    for mid in method_ids():
        assert f"(`{mid}`)" in text
    doc = Path(__file__).parents[1] / "docs" / "methods.md"
    assert doc.read_text(encoding="utf-8") == text, "regenerate: cnnlens methods --markdown > docs/methods.md"
