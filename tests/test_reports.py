"""What a person sees: the explain index, the demo's part 1 and the study report (issue 9, section 4)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
import torchvision
from PIL import Image

import cnnlens
from cnnlens.display import describe_preprocessing, method_traits, public_path, scrub_paths
from cnnlens.report import colorbar_html, render_explain_report
from cnnlens.report.demo import demo_predictions_html
from cnnlens.report.study import curves_figure, layer_grid, models_summary, render_study_report
from cnnlens.studies import LayerStudy, ModelRow, ModelStudy, compare_layers
from cnnlens.studies.layers import _group_notes

SITE = "/opt/venv/lib/python3.11/site-packages/pkg/models/w.pth"
PREP = {"input_size": [224, 224], "resize": 256, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


# ------------------------------------------------------------------------------------------------ demo part 1
def test_demo_top3_shows_names_on_lines_not_escaped_markup() -> None:
    entries = [
        {"image": "cat", "layer": ly, "method": m, "files": {"overlay": f"cat/{m}__{ly}.overlay.png"}}
        for ly in ("bn2", "early")
        for m in ("gradcam", "gradcampp")
    ]
    predictions = [
        {"image": "cat", "top": [{"name": "tiger <cat>", "probability": 0.4}, {"name": "tabby", "probability": 0.2}]}
    ]
    html = demo_predictions_html(
        model="m",
        weights=f"package pkg 0.1 ({SITE})",
        layers=["bn2", "early"],
        strides={"bn2": 32, "early": 16},
        photos=["cat"],
        entries=entries,
        predictions=predictions,
    )
    assert "&lt;br&gt;" not in html
    assert "tiger &lt;cat&gt; (0.40)<br>tabby (0.20)" in html
    thumbs = re.findall(r"<img [^>]*>", html)
    assert len(thumbs) == 4 and all('class="thumb"' in t and "width=" not in t for t in thumbs)
    assert "img.thumb { width: 160px; height: 160px;" in html
    assert "linear-gradient" in html  # the colour bar
    assert "/opt/venv" not in html and "pkg/models/w.pth" in html


# ------------------------------------------------------------------------------------------------ helpers
def test_colorbar_is_built_from_the_colour_map() -> None:
    html = str(colorbar_html("jet", label="map value"))
    assert "rgb(0,0,128) 0%" in html and "rgb(128,0,0) 100%" in html  # jet's two ends
    assert "map value" in html


def test_preprocessing_reads_as_text() -> None:
    text = describe_preprocessing({**PREP, "interpolation": "bilinear", "crop": "center"})
    assert text == "resize shorter side to 256 (bilinear), centre crop 224x224, mean 0.5 0.5 0.5, std 0.25 0.25 0.25"


def test_paths_shown_are_never_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert public_path(SITE) == "pkg/models/w.pth"
    assert public_path(tmp_path / "ckpt" / "my.pt") == "ckpt/my.pt"
    assert public_path("/somewhere/else/my.pt") == ".../my.pt"
    assert public_path("relative/x.pt") == "relative/x.pt"
    doc = scrub_paths({"w": f"checkpoint {tmp_path}/my.pt (sha 1)", "n": 3, "l": [SITE]})
    assert doc == {"w": "checkpoint my.pt (sha 1)", "n": 3, "l": ["pkg/models/w.pth"]}


def test_method_traits_come_from_the_registry() -> None:
    for mid in ("saliency", "guided_backprop", "integrated_gradients", "smoothgrad", "deconvnet"):
        assert method_traits(mid).input_level and method_traits(mid).sparse, mid
    for mid in ("gradcam", "gradcampp", "scorecam", "smoothgradcampp", "guided_gradcam"):
        assert not method_traits(mid).input_level, mid
    assert method_traits("eigencam").class_independent
    assert not method_traits("eigengradcam").class_independent


# ------------------------------------------------------------------------------------------------ explain index
@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = cnnlens.explain(
        net,
        x,
        methods=["gradcam", "gradcampp", "saliency", "eigencam"],
        layers=["layer3", "layer4"],
        top_k=2,
        options={"gradcampp": {"alpha_normalize": True}},
        image_names=["photo"],
    )
    result.manifest["model"] = {
        "name": "resnet18",
        "weights_source": f"package pkg 0.1 ({SITE})",
        "preprocessing": PREP,
    }
    out = tmp_path_factory.mktemp("explained")
    result.save(out)
    render_explain_report(out)
    return out


def _figures(html: str) -> list[str]:
    return re.findall(r"<figure>.*?</figure>", html, flags=re.S)


def test_explain_index_captions_and_repeats(explained: Path) -> None:
    html = (explained / "index.html").read_text("utf-8")
    figures = _figures(html)
    saliency = [f for f in figures if "Saliency" in f]
    assert len(saliency) == 2  # once per target, not once per listed layer (4)
    captions = [re.sub(r"<img [^>]*>", "", f) for f in saliency]  # file names keep the layer they were listed at
    assert all("input gradients" in c and "layer3" not in c and "layer4" not in c for c in captions)
    eigen = [f for f in figures if "Eigen-CAM" in f]
    assert len(eigen) == 2  # once per layer, not once per target (4)
    assert all("any class" in f and "score" not in f for f in eigen)
    assert len([f for f in figures if "Grad-CAM++" in f and "alpha_normalize=True" in f]) == 4
    assert all("cbar-bar" in f for f in figures)  # a colour bar under every map
    assert "Grad-CAM++ (alpha_normalize=True)" in html  # the methods row shows the variant


def test_explain_index_shows_text_not_dicts_or_machine_paths(explained: Path) -> None:
    html = (explained / "index.html").read_text("utf-8")
    assert "centre crop 224x224, mean 0.5 0.5 0.5, std 0.25 0.25 0.25" in html
    assert "{&#39;input_size&#39;" not in html and "'input_size'" not in html
    assert "/opt/venv" not in html and "pkg/models/w.pth" in html
    for png in explained.rglob("*.png"):
        text = Image.open(png).text  # type: ignore[attr-defined]
        assert not any("/opt/venv" in v for v in text.values()), (png, text)
        assert text["Software"].startswith("cnnlens ")


def test_sparse_maps_are_drawn_over_the_photo(explained: Path) -> None:
    """A saliency overlay keeps the photo where the map is zero: most pixels close to the photo's own."""
    manifest = __import__("json").loads((explained / "manifest.json").read_text("utf-8"))
    entry = next(r for r in manifest["results"] if r["method"] == "saliency")
    assert entry["cmap"] == "inferno" and entry["input_level"]
    grad = next(r for r in manifest["results"] if r["method"] == "gradcam")
    assert grad["cmap"] == "jet" and not grad["input_level"]


# ------------------------------------------------------------------------------------------------ study report
@pytest.fixture(scope="module")
def study() -> LayerStudy:
    net = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return compare_layers(net, x, methods=["gradcam"], last_n=1, steps=4, image_names=["a", "b"])


def _texts_px(fig: Any) -> list[tuple[str, float]]:
    out = []
    for text in fig.findobj(matplotlib.text.Text):
        if text.get_text().strip() and text.get_visible():
            out.append((text.get_text(), text.get_fontsize() * fig.dpi / 72))
    return out


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Figures the report code closes, kept for inspection."""
    import matplotlib.pyplot as plt

    kept: list[Any] = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


def test_grid_labels_are_readable_with_a_colour_bar(study: LayerStudy, tmp_path: Path, figures: list[Any]) -> None:
    study.explanations[0].degenerate[0, 0] = True  # force a degenerate mark
    layer_grid(study, "gradcam", tmp_path / "grid.png")
    fig = figures[-1]
    fig.dpi = 100  # savefig's dpi
    small = [(t, px) for t, px in _texts_px(fig) if px < 11]
    assert not small, small
    assert any("degenerate" in t for t, _ in _texts_px(fig))
    assert len(fig.axes) == len(study.explanations) * 2 + 1  # the images, then the colour bar
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("(= layer4)" in label for label in labels)  # layer4.1 and layer4 are one tensor


def test_deletion_plot_has_a_legend(study: LayerStudy, tmp_path: Path, figures: list[Any]) -> None:
    curves_figure(study, "gradcam", tmp_path / "curves.png")
    deletion, insertion = figures[-1].axes
    assert deletion.get_legend() is not None and insertion.get_legend() is not None


def _rows(model: str, dele: float, ins: float, drop: float, top1: list[str]) -> ModelRow:
    return ModelRow(model, "f", False, "gradcam", "layer4.1", "recommended", drop, 0.0, dele, ins, 0.0, top1)


def test_models_summary_states_the_answer(study: LayerStudy) -> None:
    ms = ModelStudy(
        rows=[_rows("a", 0.2, 0.6, 10.0, ["cat", "dog"]), _rows("b", 0.3, 0.5, 20.0, ["cat", "fox"])],
        layer_studies={"a": study, "b": study},
        image_names=["x", "y"],
    )
    lines = models_summary(ms)
    assert lines[0].startswith("gradcam: a is best on all three measures")
    assert "differ on 1 of 2 image(s): y" in lines[1]


def test_study_report_puts_the_answer_first(study: LayerStudy, tmp_path: Path) -> None:
    ms = ModelStudy(
        rows=[_rows("a", 0.2, 0.6, 10.0, ["cat", "dog"])], layer_studies={"a": study}, image_names=["a", "b"]
    )
    index = render_study_report(
        tmp_path,
        title="t",
        layer_studies={"a": study},
        model_study=ms,
        manifest={"model": {"weights_source": f"package pkg ({SITE})"}},
    )
    html = index.read_text("utf-8")
    assert html.index('class="summary"') < html.index("Models, each at its best layer") < html.index("Target layers")
    assert "<details><summary>Target layers: a: gradcam → " in html
    assert "same tensor as layer4" in html
    assert "/opt/venv" not in (tmp_path / "study.json").read_text("utf-8")


def test_warning_box_keeps_the_advice() -> None:
    message = (
        "Grad-CAM++ on layer '{}' whose activations take negative values: alpha has a pole at g = -2/sum(A), "
        "which then falls on positive gradients and can blow up the weights. Prefer a post-ReLU layer."
    )
    notes = _group_notes([message.format("a"), message.format("b"), message.format("a")])
    assert notes == [message.replace("layer '{}'", "layers 'a', 'b'")]
    assert "Prefer a post-ReLU layer" in notes[0]


def test_forward_view_figures_have_readable_labels() -> None:
    """Tile labels, row labels and colour bars of the filter/feature-map figures are at least 11 px."""
    import numpy as np

    from cnnlens.viz.grids import GridRow, image_grid, rows_figure

    maps = [np.random.default_rng(0).random((7, 7)) for _ in range(4)]
    grid = image_grid(maps, [f"#{i} 6.29" for i in range(4)], colorbar="activation", title="t")
    rows = rows_figure([GridRow("blocks.6\n7x7", maps, ["#1 2.0"] * 4, (0.0, 1.0), "RdBu_r")], title="t")
    for fig in (grid, rows):
        small = [(t, px) for t, px in _texts_px(fig) if px < 11]
        assert not small, small


# ------------------------------------------------------------------------------------------------ run report
RUN_NET = """
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
"""


def test_run_report_mean_maps_have_a_colour_bar(tmp_path: Path) -> None:
    from cnnlens.report import render_run_report
    from cnnlens.runs import RunSettings, load_run_model, read_dataset, run_dataset

    torch.manual_seed(0)
    (tmp_path / "net.py").write_text(RUN_NET)
    rng = torch.Generator().manual_seed(1)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.png")
    model = load_run_model(f"{tmp_path / 'net.py'}:build", class_names=["a", "b"], input_size=[16])
    data = read_dataset(tmp_path / "data", model.class_names)
    run_dataset(tmp_path / "run", data, model, RunSettings(methods=("gradcam",)), workers=0)
    html = (render_run_report(tmp_path / "run", cmap="viridis")).read_text("utf-8")
    means = html[html.index("Per-class mean maps") :]
    assert 'alt="mean map of a"' in means  # the mean maps are there ...
    bar = re.search(r'<div class="cbar">.*?</div>', means, flags=re.S)
    assert bar is not None and "cbar-bar" in bar.group(0)  # ... with a colour bar
    assert "rgb(68,1,84) 0%" in bar.group(0)  # of the maps' own colour map (viridis' first colour)
    assert ".cbar-bar {" in html  # styled
