"""The explorer of `cnnlens serve` driven in real Chromium (Debian's /usr/bin/chromium) through Playwright.

A real uvicorn server (``create_app`` on the embedded EfficientNet-Lite0, one tiny dataset run made by a real
``cnnlens run``) listens on a free 127.0.0.1 port in a thread for the whole module. The tests click the way a
person would and compare the pixels of screenshots of the map, not only the DOM: a changed class, layer or
method must change the picture.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tests.serve_live import CHROMIUM, LiveServer, create_app, launch_chromium, make_run, photo_bytes

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

TIMEOUT_MS = 30_000
MAX_UPLOAD = 1_000_000  # the server's upload limit in these tests (bytes)
# Mean absolute difference (0..255 per channel) above which two screenshots of a map count as different
# pictures. Two screenshots of the same map differ by 0; the real changes measured here are 11 to 67.
DIFFERENT = 3.0
RUN_FOLDERS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run = make_run(tmp_path_factory.mktemp("serve-run"))
    RUN_FOLDERS["run"] = run
    # the folder that holds the run (and the run's data, net and class names, which are not runs): a folder of
    # runs, whose later runs the page opens with "Look for new runs"
    with LiveServer(create_app([run.parent], max_upload_bytes=MAX_UPLOAD)) as live:
        yield live.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    elsewhere: list[str] = []  # every request must go to the local server: no CDN, works offline
    context.on("request", lambda r: None if r.url.startswith((server + "/", "data:")) else elsewhere.append(r.url))
    pg.goto(server + "/")
    pg.wait_for_selector("#sample-select option[value='chelsea']", state="attached")
    yield pg
    context.close()
    assert not errors, errors  # no uncaught exception in the page's script
    assert not elsewhere, elsewhere


def shot(page: Any, selector: str) -> np.ndarray:
    """The element's pixels as the browser draws them (a decoded PNG screenshot), as float RGB."""
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"), dtype=np.float64)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


def map_id(page: Any, panel: str = "a") -> str:
    return str(page.get_attribute(f"#panel-{panel}", "data-map-id") or "")


def wait_new_map(page: Any, old: str, panel: str = "a") -> str:
    """Wait until the panel shows a map other than `old`, fully loaded."""
    page.wait_for_function(
        "([p, old]) => { const el = document.getElementById('panel-' + p);"
        " return el.dataset.state === 'ready' && el.dataset.mapId && el.dataset.mapId !== old; }",
        arg=[panel, old],
    )
    return map_id(page, panel)


def upload(page: Any, name: str, payload: bytes, mime: str) -> None:
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": mime, "buffer": payload}])


def error_text(page: Any) -> str:
    page.wait_for_selector("#error", state="visible")
    return str(page.inner_text("#error"))


# ------------------------------------------------------------------------------------------------ Explain view
def test_upload_shows_a_map_and_class_layer_method_change_it(page: Any) -> None:
    upload(page, "chelsea.jpg", photo_bytes(), "image/jpeg")
    first = wait_new_map(page, "")
    page.wait_for_selector("[data-testid=class-chip]")
    assert page.locator("[data-testid=class-chip]").count() == 5
    assert "cat" in page.inner_text("#topk")  # the embedded ImageNet model sees Chelsea's cat
    assert page.get_attribute("#input-image", "data-state") == "loaded"
    base = shot(page, "#overlay-a")
    assert base.std() > 10  # a picture, not a blank box
    assert difference(base, shot(page, "#overlay-a")) == 0.0  # the measure itself: same map, same pixels

    # another class: the third prediction chip
    chip = page.locator("[data-testid=class-chip]").nth(2)
    index = chip.get_attribute("data-index")
    chip.click()
    second = wait_new_map(page, first)
    assert f"#{index}," in page.inner_text("#info-a")
    assert page.locator("[data-testid=class-chip]").nth(2).get_attribute("aria-pressed") == "true"
    by_class = shot(page, "#overlay-a")
    assert difference(base, by_class) > DIFFERENT

    # another layer: the first of the strip (the recommended one is selected at start)
    assert page.locator(".layer[aria-pressed=true]").first.get_attribute("class") == "layer recommended"
    strip = page.locator("[data-testid=layer]")
    assert strip.count() >= 3
    layer = strip.first.get_attribute("data-layer")
    strip.first.click()
    third = wait_new_map(page, second)
    assert f"@ {layer} " in page.inner_text("#info-a")
    by_layer = shot(page, "#overlay-a")
    assert difference(by_class, by_layer) > DIFFERENT

    # another method: the capture of that layer (and every later one) is reused, no new forward
    page.select_option("#method-select", "layercam")
    fourth = wait_new_map(page, third)
    assert "layercam @" in page.inner_text("#info-a")
    assert "capture reused" in page.inner_text("#info-a")
    by_method = shot(page, "#overlay-a")
    assert difference(by_layer, by_method) > DIFFERENT

    # a later layer: reused too, and another picture
    middle = strip.nth(strip.count() // 2)
    middle.click()
    wait_new_map(page, fourth)
    assert f"@ {middle.get_attribute('data-layer')} " in page.inner_text("#info-a")
    assert "capture reused" in page.inner_text("#info-a")
    assert difference(by_method, shot(page, "#overlay-a")) > DIFFERENT

    # the colour map changes the picture without a new explanation
    same = map_id(page)
    page.select_option("#colormap", "viridis")
    page.wait_for_function("document.getElementById('overlay-a').src.includes('colormap=viridis')")
    page.wait_for_function("document.getElementById('overlay-a').dataset.state === 'loaded'")
    assert map_id(page) == same
    assert page.get_attribute("#dl-npy-a", "href") == f"/api/maps/{same}/map.npy"
    assert page.locator("#error").is_hidden()


def test_class_search_and_faithfulness_curve(page: Any) -> None:
    page.select_option("#sample-select", "chelsea")
    first = wait_new_map(page, "")
    page.fill("#class-search", "golden retriever")
    result = page.locator("[data-testid=class-result]").first
    result.wait_for()
    assert result.inner_text() == "golden retriever"
    result.click()
    wait_new_map(page, first)
    assert f"#{result.get_attribute('data-index')}," in page.inner_text("#info-a")

    page.click("#metrics-a")
    curve = page.locator("#metrics-out-a [data-testid=metrics-curve]")
    curve.wait_for()
    for name in ("deletion", "insertion"):
        points = curve.locator(f"polyline[data-curve={name}]").get_attribute("points") or ""
        assert len(points.split()) >= 2, points
    auc = float(page.inner_text("#metrics-out-a [data-testid=deletion-auc]"))
    assert 0.0 <= auc <= 1.0


def test_compare_mode_shows_two_different_maps(page: Any) -> None:
    page.select_option("#sample-select", "chelsea")
    wait_new_map(page, "")
    page.check("#compare-toggle")
    b_first = wait_new_map(page, "", "b")
    assert page.locator("#panel-a").is_visible() and page.locator("#panel-b").is_visible()
    layer_a = page.locator(".layer[aria-pressed=true]").get_attribute("data-layer")
    assert page.input_value("#layer-b") != layer_a  # B starts at another layer
    a, b = shot(page, "#overlay-a"), shot(page, "#overlay-b")
    assert difference(a, b) > DIFFERENT
    # B's own method: the picture of B changes, A's does not
    page.select_option("#method-b", "eigencam")
    wait_new_map(page, b_first, "b")
    assert "eigencam @" in page.inner_text("#info-b")
    assert difference(b, shot(page, "#overlay-b")) > DIFFERENT
    assert difference(a, shot(page, "#overlay-a")) == 0.0


def test_two_tabs_at_once(page: Any, server: str) -> None:
    other = page.context.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(server + "/")
    other.wait_for_selector("#sample-select option[value='coffee']", state="attached")
    # both tabs ask at the same time, for different images
    page.select_option("#sample-select", "chelsea")
    other.select_option("#sample-select", "coffee")
    wait_new_map(page, "")
    first_other = wait_new_map(other, "")
    assert "cat" in page.inner_text("#info-a")
    assert "espresso" in other.inner_text("#info-a")
    assert difference(shot(page, "#overlay-a"), shot(other, "#overlay-a")) > DIFFERENT
    # each tab keeps its own image: a class click in one does not touch the other
    before = shot(page, "#overlay-a")
    other.locator("[data-testid=class-chip]").nth(1).click()
    wait_new_map(other, first_other)
    assert difference(before, shot(page, "#overlay-a")) == 0.0
    assert "espresso" not in other.inner_text("#info-a")
    other.close()


# ------------------------------------------------------------------------------------------------ errors
def test_oversized_and_bad_uploads_show_the_error(page: Any) -> None:
    big = os.urandom(MAX_UPLOAD + 100_000)
    upload(page, "huge.jpg", big, "image/jpeg")
    text = error_text(page)
    assert page.get_attribute("#error", "data-code") == "upload_too_large"
    assert page.get_attribute("#error", "role") == "alert"
    assert "Traceback" not in text and 'File "' not in text
    assert page.locator("#panel-a").is_hidden()  # no map was made

    # dropped on the drop zone: a file that is no image
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array([1, 2, 3, 4, 5])], "notes.png", {type: "image/png"}));
            document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }"""
    )
    page.wait_for_function("document.getElementById('error').dataset.code === 'bad_image'")
    assert "Traceback" not in page.inner_text("#error")

    # a good image afterwards clears the message and shows a map
    upload(page, "chelsea.jpg", photo_bytes(), "image/jpeg")
    wait_new_map(page, "")
    assert page.locator("#error").is_hidden()


# ------------------------------------------------------------------------------------------------ Run view
def test_run_view_filters_change_the_listed_images(page: Any) -> None:
    page.click("#tab-run")
    rows = page.locator("[data-testid=run-row]")
    page.wait_for_function("document.querySelectorAll('[data-testid=run-row]').length === 5")
    assert page.inner_text("[data-testid=run-accuracy]") == "80.0 %"

    def names() -> list[str]:
        return sorted(rows.nth(i).locator("header strong").inner_text() for i in range(rows.count()))

    def listed(n: int) -> list[str]:
        page.wait_for_function(f"document.getElementById('run-count').textContent.startsWith('({n} of')")
        return names()

    page.select_option("#run-filter", "incorrect")
    assert listed(1) == ["green_labelled_red.png"]
    wrong = rows.first
    assert wrong.get_attribute("data-correct") == "false"
    assert "predicted: green" in wrong.inner_text() and "true: red" in wrong.inner_text()
    page.select_option("#run-filter", "correct")
    assert listed(4) == ["green0.png", "green1.png", "red0.png", "red1.png"]
    page.select_option("#run-true", label="green")
    assert listed(2) == ["green0.png", "green1.png"]
    page.click("#run-clear")
    assert len(listed(5)) == 5

    # a confusion-matrix cell: true red, predicted green (classes in the model's order: red=0, green=1)
    cell = page.locator("td[data-true='0'][data-pred='1']")
    assert cell.inner_text() == "1"
    cell.click()
    assert listed(1) == ["green_labelled_red.png"]
    # the stored maps of the mistake are shown (never recomputed), the image too
    all_loaded = "Array.from(document.querySelectorAll('[data-testid=run-row] img')).every(i => i.complete && i.naturalWidth > 0)"
    page.wait_for_function(all_loaded)
    assert rows.first.locator("img").count() == 3
    gradcam = shot(page, "[data-testid=run-row] img >> nth=1")

    # the run stored two maps per image: the other one (saliency) replaces Grad-CAM's picture
    assert page.locator("#run-pair").is_visible()
    page.select_option("#run-pair", "saliency@input")
    page.wait_for_function(
        "Array.from(document.querySelectorAll('[data-testid=run-row] img')).some(i => i.src.includes('pair=saliency'))"
    )
    page.wait_for_function(all_loaded)
    assert listed(1) == ["green_labelled_red.png"]
    assert difference(gradcam, shot(page, "[data-testid=run-row] img >> nth=1")) > DIFFERENT

    # a run finished after the server started, in the folder of runs it was given: opened from the page
    run = RUN_FOLDERS["run"]
    assert page.locator("#run-select option").count() == 1
    shutil.copytree(run, run.parent / "run-later")
    page.click("#run-rescan")
    page.wait_for_function("document.querySelectorAll('#run-select option').length === 2")
    assert page.locator("#run-select").input_value() == page.locator("#run-select option").first.get_attribute("value")
    assert "run-later" in page.locator("#run-select option").nth(1).inner_text()
    assert page.locator("#error").is_hidden()


# ------------------------------------------------------------------------------------------------ Network view
def test_network_view_filters_features_and_a_cancelled_job(page: Any) -> None:
    page.select_option("#sample-select", "chelsea")
    wait_new_map(page, "")
    page.click("#tab-network")
    page.click("#filters-show")  # no layer typed: the first convolution
    page.wait_for_function("document.getElementById('filters-img').dataset.state === 'loaded'")
    assert shot(page, "#filters-img").std() > 5
    page.fill("#filter-layer", "bn2")  # a batch norm has no filters: the server's message, in the page
    page.click("#filters-show")
    page.wait_for_function("document.getElementById('error').dataset.code === 'bad_layer'")
    assert page.locator("#filters-img").is_hidden()

    page.click("#features-show")
    page.wait_for_function("document.getElementById('features-img').dataset.state === 'loaded'")
    assert page.locator("#error").is_hidden()
    assert page.inner_text("#features-list").count("#") == 16
    assert shot(page, "#features-img").std() > 5

    # activation maximisation: a short job to its picture, then a long one cancelled from the page
    page.fill("#max-channels", "0")
    page.fill("#max-steps", "2")
    page.click("#max-start")
    page.wait_for_function("document.getElementById('max-result').dataset.state === 'loaded'", timeout=60_000)
    assert page.get_attribute("#max-state", "data-state") == "done"
    assert float(page.eval_on_selector("#max-progress", "p => p.value")) == 1.0
    page.fill("#max-steps", "2048")
    page.click("#max-start")
    page.wait_for_function("document.getElementById('max-progress').value > 0", timeout=60_000)
    page.click("#max-cancel")
    page.wait_for_function("document.getElementById('max-state').dataset.state === 'cancelled'")
    assert page.locator("#max-result").is_hidden()
    assert page.is_enabled("#max-start") and not page.is_enabled("#max-cancel")
