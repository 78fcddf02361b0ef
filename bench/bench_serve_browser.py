"""Benchmark the explorer of ``cnnlens serve`` in real Chromium: the first map after an upload, end to end.

Run ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serve_browser.py`` (under a minute on 2 cores);
``--repeats N`` uploads (default 8).

The real app (``create_app``, the embedded ``efficientnet_lite0``, default method Grad-CAM at the recommended
layer) is served by uvicorn on a free 127.0.0.1 port in this process; Debian's Chromium is driven through
Playwright. One upload is timed *in the page* (``performance.now()``) from the moment the file is handed to the
page (file picker ``change``) until the overlay of the top class has loaded in its ``<img>``: the upload
(multipart POST), the prediction and the explanation (started together), and the overlay PNG's request and
decode. Every upload is a different file (scikit-image photos, shifted crops), so no server cache can answer
it. The model is loaded when the page opens (``/api/layers``), before any upload; the very first upload
(``cold``: the process's first forward and backward) is reported apart from the others (median, min, max). The
server's background prefetch (``ServeConfig.warmup``, on by default as in ``cnnlens serve``: after a map, the
image's recording is extended to every layer once the server is idle) stays on, and each upload waits until it
is done, as when a person looks at a map before the next upload (``--no-wait`` uploads at once instead). The
Python-side wall time (``set_input_files`` to the panel's ``ready`` state, which also waits for the heat map and
signed map) is printed beside it.

Issue target: the first map after an upload <= 1 s end to end in the browser (2 CPU cores).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.serve_live import LiveServer, create_app, launch_chromium  # noqa: E402

from _common import describe_machine, machine_info  # noqa: E402

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
READY = (
    "(old) => { const e = document.getElementById('panel-a');"
    " return e.dataset.state === 'ready' && e.dataset.mapId !== old; }"
)


def upload_bytes(k: int) -> bytes:
    """The k-th upload: a sample photo cropped by a k-dependent offset (a different file every time)."""
    from skimage import data

    pixels = getattr(data, PHOTOS[k % len(PHOTOS)])()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    shift = 4 * (k // len(PHOTOS) + 1)
    buf = io.BytesIO()
    Image.fromarray(pixels[shift:, shift:]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="uploads after the cold one")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for the server's prefetch to finish")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    info = machine_info()
    print(describe_machine(info))
    in_page: list[float] = []
    wall: list[float] = []
    app = create_app([])
    prefetch = getattr(app.state.cnnlens.engine, "prefetch", None)
    with LiveServer(app) as live, sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(live.url + "/")
        page.wait_for_selector("#sample-select option[value='chelsea']", state="attached")
        for k in range(args.repeats + 1):
            payload = upload_bytes(k)
            if prefetch is not None and not args.no_wait:
                prefetch.wait_idle(120)
            old = page.get_attribute("#panel-a", "data-map-id") or ""
            start = time.perf_counter()
            page.set_input_files(
                "#file-input", files=[{"name": f"upload{k}.jpg", "mimeType": "image/jpeg", "buffer": payload}]
            )
            page.wait_for_function(READY, arg=old)
            wall.append(1000 * (time.perf_counter() - start))
            in_page.append(float(page.evaluate("window.cnnlens.lastMapMs")))
            if page.locator("#error").is_visible():
                raise RuntimeError(page.inner_text("#error"))
        browser.close()
    warm, warm_wall = in_page[1:], wall[1:]
    print(f"first map after an upload, in the browser (file handed to the page -> overlay loaded), {len(warm)} +1:")
    print(f"  cold (first upload after start): {in_page[0]:.0f} ms (Python wall {wall[0]:.0f} ms)")
    print(
        f"  warm: median {statistics.median(warm):.0f} ms, min {min(warm):.0f}, max {max(warm):.0f}"
        f" (Python wall median {statistics.median(warm_wall):.0f} ms)"
    )
    print(f"  target <= 1000 ms: {'met' if statistics.median(warm) <= 1000 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "in_page_ms": in_page, "wall_ms": wall}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
