"""Jupyter: results display themselves (inline overlays, matplotlib figures), and the tutorial notebooks run.

The display tests decode the PNGs of ``_repr_html_`` and compare them with the overlays
:mod:`cnnlens.imaging` draws for the same maps (the ``.overlay.png`` rule). The notebook tests check that the
committed notebooks carry no outputs and execute each one from top to bottom with nbclient, on a kernel spec
written into the test's temporary folder (the venv's own Python; nothing installed for the user).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.nets import GapHead, seeded

import cnnlens
from cnnlens.imaging import overlay, overlay_weighted

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


class _Page(HTMLParser):
    """The images (decoded PNGs), their alt texts and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[np.ndarray] = []
        self.alts: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img":
            src = found["src"] or ""
            assert src.startswith("data:image/png;base64,"), src[:40]
            data = base64.b64decode(src.partition(",")[2])
            self.images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            self.alts.append(found.get("alt") or "")
            assert (int(found["width"] or 0), int(found["height"] or 0)) == self.images[-1].shape[1::-1]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


@pytest.fixture(scope="module")
def result() -> cnnlens.ExplanationSet:
    torch.manual_seed(0)
    net = seeded(GapHead(classes=5), dtype=torch.float32).eval()
    photo = torch.rand(3, 3, 48, 40)
    return cnnlens.explain(
        net,
        photo,
        methods=["gradcam", "saliency"],
        layers=["body.1", "body.4"],
        top_k=2,
        image_names=["cat", "dog", "car"],
        class_names=["zero", "one", "two", "three", "four"],
    )


def test_explanation_repr_html_shows_each_map_over_its_image(result: cnnlens.ExplanationSet) -> None:
    e = result["gradcam", "body.4"]
    page = _parse(e._repr_html_())
    assert len(page.images) == e.batch_size * e.num_targets == 6
    assert e.images is not None
    k = 0
    for b in range(e.batch_size):
        for t in range(e.num_targets):
            expected = overlay(e.images[b].numpy(), e.maps[b, t].numpy(), alpha=0.5, cmap="jet")
            assert page.images[k].shape == (48, 40, 3)
            assert np.array_equal(page.images[k], expected)  # the overlay file's pixels, not a placeholder
            assert page.images[k].std() > 1.0  # not blank
            assert e.image_names[b] in page.alts[k] and e.class_label(b, t).split()[1] in page.alts[k]
            k += 1
    text = " ".join(page.text)
    assert "Grad-CAM" in text and "body.4" in text and f"{float(e.scores[0, 0]):.3g}" in text


def test_pixel_attributions_are_weighted_overlays_and_differ_from_cams(result: cnnlens.ExplanationSet) -> None:
    sal, cam = result["saliency", None], result["gradcam", "body.4"]
    page = _parse(sal._repr_html_())
    assert sal.images is not None
    expected = overlay_weighted(sal.images[0].numpy(), sal.maps[0, 0].numpy(), cmap="inferno")
    assert np.array_equal(page.images[0], expected)
    cam_page = _parse(cam._repr_html_())
    assert np.abs(page.images[0].astype(int) - cam_page.images[0].astype(int)).mean() > 5  # different maps


def test_set_repr_html_caps_the_count_and_says_how_many_more(result: cnnlens.ExplanationSet) -> None:
    total = sum(e.batch_size * e.num_targets for e in result)  # 3 images x 2 targets x 3 results = 18
    assert total == 18
    page = _parse(result._repr_html_())
    assert len(page.images) == 12
    text = " ".join(page.text)
    assert "6 more maps not shown (of 18)" in text
    assert "cat: predicted" in text and "gradcam, saliency" in text
    # image by image: the first image's three results (gradcam at two layers, saliency) x two targets first
    assert [a.split(",")[0] for a in page.alts[:6]] == [
        "Grad-CAM at body.1",
        "Grad-CAM at body.1",
        "Grad-CAM at body.4",
        "Grad-CAM at body.4",
        "Saliency (vanilla gradient) at input",
        "Saliency (vanilla gradient) at input",
    ]
    assert all(a.split(", ")[1].startswith("cat:") for a in page.alts[:6])
    assert all(a.split(", ")[1].startswith("dog:") for a in page.alts[6:12])
    assert cnnlens.ExplanationSet([])._repr_html_().count("<img") == 0


def test_large_maps_are_shrunk_for_display() -> None:
    net = seeded(GapHead(classes=3), dtype=torch.float32).eval()
    e = cnnlens.explain(net, torch.rand(1, 3, 300, 600), layers=["body.4"])["gradcam", "body.4"]
    page = _parse(e._repr_html_())
    assert page.images[0].shape == (128, 256, 3)


def test_volumes_show_their_middle_depth_slice() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten()
    )
    torch.manual_seed(1)
    e = cnnlens.explain(net.eval(), torch.rand(1, 3, 6, 16, 20), layers=["1"])["gradcam", "1"]
    assert e.is_volume and e.images is not None and e.depth_slice == 3
    page = _parse(e._repr_html_())
    expected = overlay(e.images[0].numpy(), e.maps[0, 0, 3].numpy())
    assert np.array_equal(page.images[0], expected)


def test_figure_and_show_draw_the_same_tiles(result: cnnlens.ExplanationSet, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = result.figure(limit=5, columns=2)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 5
    first = result["gradcam", "body.1"]
    assert first.images is not None
    shown = axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(shown), overlay(first.images[0].numpy(), first.maps[0, 0].numpy()))
    assert "Grad-CAM @ body.1" in axes[0].get_title() and "cat: " in axes[1].get_title()
    assert any("13 more maps not shown (of 18)" in t.get_text() for t in fig.texts)
    before = set(plt.get_fignums())
    result["gradcam", "body.4"].show(limit=2)  # Agg: drawn with pyplot, not shown, no warning
    new = set(plt.get_fignums()) - before
    assert len(new) == 1
    assert len([ax for ax in plt.figure(new.pop()).axes if ax.images]) == 2
    plt.close("all")


# ------------------------------------------------------------------------------------------------ the tutorials
def test_notebooks_are_committed_without_outputs() -> None:
    assert len(NOTEBOOKS) >= 2, "the tutorials are notebooks/*.ipynb"
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, (
                    f"strip the outputs of {path}: python scripts/strip_notebooks.py"
                )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    spec_dir = tmp_path / "kernels" / "cnnlens-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cnnlens (test)",
        "language": "python",
        # TMPDIR: the tutorials' temporary folders land in the test's own folder, removed with it
        "env": {
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "MPLBACKEND": "Agg",
            "TMPDIR": str(tmp_path),
            "IPYTHONDIR": str(tmp_path / "ipython"),  # no history database in the user's ~/.ipython
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files stay here too
    manager = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    notebook = nbformat.read(path, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    kernel = KernelManager(kernel_name="cnnlens-test", kernel_spec_manager=manager)
    client = NotebookClient(
        notebook, km=kernel, timeout=240, kernel_name="cnnlens-test", resources={"metadata": {"path": str(work)}}
    )
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    html = [o for c in notebook.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert html, "the notebook displays a result (its _repr_html_)"
    assert any("data:image/png;base64," in o["data"]["text/html"] for o in html)

    # scripts/strip_notebooks.py turns the executed notebook back into the committed one
    import importlib.util

    spec = importlib.util.spec_from_file_location("strip_notebooks", ROOT / "scripts" / "strip_notebooks.py")
    assert spec is not None and spec.loader is not None
    stripper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stripper)
    executed = tmp_path / path.name
    nbformat.write(notebook, executed)
    assert stripper.strip(executed) and not stripper.strip(executed)
    cleaned = nbformat.read(executed, as_version=4)
    assert [(c.cell_type, c.source) for c in cleaned.cells] == [
        (c.cell_type, c.source) for c in nbformat.read(path, 4).cells
    ]
    assert all(c.outputs == [] and c.execution_count is None for c in cleaned.cells if c.cell_type == "code")
