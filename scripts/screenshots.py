"""Screenshots of the `cnnlens serve` explorer for the README and docs: docs/images/serve-*.png.

Run ``OMP_NUM_THREADS=1 .venv/bin/python scripts/screenshots.py`` from the repository root (about a minute on
2 cores). It starts the real app (``create_app``, the embedded EfficientNet-Lite0, a 5-photo dataset run made
by ``cnnlens run``) on a free 127.0.0.1 port, drives Debian's Chromium through Playwright the way a person clicks,
and writes:

* ``serve-explain.png``: Chelsea uploaded, Grad-CAM of the top class at the recommended layer, the faithfulness
  numbers and the deletion/insertion curves;
* ``serve-compare.png``: compare mode, Grad-CAM at the recommended layer beside LayerCAM at a stride-16 one;
* ``serve-run.png``: the run view of a 5-photo run (ImageNet class folders) filtered to its 3 mistakes, each
  with its stored predicted-class and true-class maps;
* ``serve-network.png``: the first convolution's filters, the ranked feature maps of a stride-16 layer for the
  current image and an activation-maximisation job of four of its channels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serve_live import LiveServer, create_app, launch_chromium, photo_bytes  # noqa: E402

READY = (
    "([p, old]) => { const e = document.getElementById('panel-' + p);"
    " return e.dataset.state === 'ready' && e.dataset.mapId !== old; }"
)


def wait_map(page: Any, panel: str = "a", old: str = "") -> str:
    """Wait until the panel shows a loaded map other than ``old``; its map id."""
    page.wait_for_function(READY, arg=[panel, old])
    return page.get_attribute(f"#panel-{panel}", "data-map-id") or ""


PHOTO_RUN = {  # ImageNet class folder -> scikit-image photo; the embedded model gets three of them wrong
    "tabby": "chelsea",
    "espresso": "coffee",
    "space shuttle": "rocket",
    "tripod": "camera",
    "wall clock": "clock",
}


def make_photo_run(folder: Path) -> Path:
    """A 5-photo `cnnlens run` of the embedded EfficientNet-Lite0 (Grad-CAM at its default layer)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from cnnlens.cli import main as cnnlens

    for label, photo in PHOTO_RUN.items():
        pixels = getattr(data, photo)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        (folder / "photos" / label).mkdir(parents=True)
        Image.fromarray(pixels[..., :3]).save(folder / "photos" / label / f"{photo}.png")
    out = folder / "run"
    if cnnlens(["run", str(folder / "photos"), "--method", "gradcam", "--workers", "0", "--out", str(out)]) != 0:
        raise RuntimeError("cnnlens run failed")
    return out


def main() -> int:
    """Write the four screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for serve-*.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_photo_run(Path(tmp))
        with LiveServer(create_app([run])) as live, sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
            page.set_default_timeout(60_000)
            page.goto(live.url + "/")
            page.wait_for_selector("#sample-select option[value='chelsea']", state="attached")

            # a first map (the process's first forward and backward are slower), so the shown timings are warm
            page.select_option("#sample-select", "coffee")
            coffee = wait_map(page)

            # Explain: an upload through the file picker, then the faithfulness curves
            page.set_input_files(
                "#file-input", files=[{"name": "chelsea.jpg", "mimeType": "image/jpeg", "buffer": photo_bytes()}]
            )
            wait_map(page, "a", coffee)
            page.wait_for_function("document.getElementById('topk').textContent.includes('tiger cat')")
            page.click("#metrics-a")
            page.wait_for_selector("#metrics-out-a [data-testid=metrics-curve]")
            page.screenshot(path=str(args.out / "serve-explain.png"), full_page=True)

            # Compare: B with LayerCAM at the last stride-16 layer (an earlier stage)
            mid = page.evaluate(
                "() => Array.from(document.querySelectorAll('#layer-strip .layer'))"
                ".filter(b => b.querySelector('.shape').textContent.endsWith('/16')).map(b => b.dataset.layer).pop()"
            )
            page.check("#compare-toggle")
            b = wait_map(page, "b")
            page.select_option("#layer-b", mid)
            b = wait_map(page, "b", b)
            page.select_option("#method-b", "layercam")
            wait_map(page, "b", b)
            page.screenshot(path=str(args.out / "serve-compare.png"), full_page=True)
            page.uncheck("#compare-toggle")

            # Network: filters of the first convolution, ranked feature maps at that layer, a maximisation job
            page.click("#tab-network")
            page.click("#filters-show")
            page.wait_for_function("document.getElementById('filters-img').dataset.state === 'loaded'")
            page.select_option("#net-layer", mid)
            page.click("#features-show")
            page.wait_for_function("document.getElementById('features-img').dataset.state === 'loaded'")
            page.fill("#max-channels", "0, 1, 2, 3")
            page.fill("#max-steps", "48")
            page.click("#max-start")
            page.wait_for_function("document.getElementById('max-result').dataset.state === 'loaded'", timeout=300_000)
            page.screenshot(path=str(args.out / "serve-network.png"), full_page=True)

            # Run: the mistakes ("why did it call this wall clock a bubble?")
            page.click("#tab-run")
            page.wait_for_selector("[data-testid=run-row]")
            page.select_option("#run-filter", "incorrect")
            page.wait_for_function("document.getElementById('run-count').textContent.startsWith('(3 of')")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#run-rows img')).every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(args.out / "serve-run.png"), full_page=True)
            browser.close()
    for name in ("explain", "compare", "run", "network"):
        print(args.out / f"serve-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
