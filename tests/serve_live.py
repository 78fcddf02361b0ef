"""A live `cnnlens serve` for browser checks: shared by tests/test_serve_browser.py, scripts/screenshots.py and
bench/bench_serve_browser.py (no pytest here).

:class:`LiveServer` runs uvicorn on an already bound free 127.0.0.1 port in a daemon thread; :func:`make_run`
makes a tiny dataset run with the real ``cnnlens run``; :func:`launch_chromium` starts Debian's Chromium.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

RUN_NET = """
import torch
from torch import nn


def build():
    # class 0 ("red") scores where red beats green, class 1 ("green") the reverse: predictions are known.
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]).view(2, 3, 1, 1))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""

RUN_IMAGES = {  # file -> (colour, true class): the net predicts by colour, so only the third is a mistake
    "red/red0.png": ((220, 30, 30), 0),
    "red/red1.png": ((200, 40, 20), 1),
    "red/green_labelled_red.png": ((30, 200, 30), 2),
    "green/green0.png": ((20, 220, 40), 3),
    "green/green1.png": ((40, 210, 30), 4),
}


def _square(path: Path, rgb: tuple[int, int, int], seed: int, size: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[...] = rgb
    y, x = rng.integers(size // 8, size // 2, 2)
    pixels[y : y + size // 3, x : x + size // 3] = 128  # a grey patch the maps can point at
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_run(folder: Path, size: int = 32) -> Path:
    """A 5-image run of a 2-class colour net by the real `cnnlens run`: 4 correct, 1 green image labelled red.

    Two stored maps per image: Grad-CAM at layer ``0`` and saliency (``gradcam@0``, ``saliency@input``).

    Args:
        folder: An empty folder; the net, the class names, the images and the run (``run/``) go in it.
        size: Side of the square images (and the net's input size).

    Returns:
        The run folder.
    """
    from cnnlens.cli import main

    (folder / "net.py").write_text(RUN_NET)
    (folder / "classes.txt").write_text("red\ngreen\n")
    data = folder / "data"
    for name, (rgb, seed) in RUN_IMAGES.items():
        _square(data / name, rgb, seed, size)
    out = folder / "run"
    args = ["run", str(data), "--model", f"{folder / 'net.py'}:build", "--class-names", str(folder / "classes.txt")]
    args += [
        "--input-size",
        str(size),
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--method",
        "gradcam",
        "saliency",
        "--layer",
        "0",
    ]
    if main([*args, "--no-average-drop", "--workers", "0", "--out", str(out)]) != 0:
        raise RuntimeError("cnnlens run failed")
    return out


def create_app(runs: list[Path], **config: Any) -> Any:
    """The real `cnnlens.serve.app.create_app` (zoo models that load offline) with these run folders."""
    from cnnlens.serve.app import create_app as make
    from cnnlens.serve.config import ServeConfig

    return make(ServeConfig(runs=tuple(str(r) for r in runs), **config))


class LiveServer:
    """uvicorn serving an ASGI app on a free 127.0.0.1 port in a daemon thread (a context manager)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium, headless, through Playwright (its own browser download cannot work offline)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def photo_bytes(name: str = "chelsea", fmt: str = "JPEG") -> bytes:
    """A scikit-image sample photo encoded as a file would be."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, fmt)
    return buf.getvalue()
