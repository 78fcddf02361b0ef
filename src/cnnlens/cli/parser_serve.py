"""The ``cnnlens serve`` parser (no torch, no FastAPI import: ``--help`` stays instant)."""

from __future__ import annotations

from typing import Any

from cnnlens._names import DEFAULT_MAX_PIXELS

__all__ = ["add_serve_command"]


def add_serve_command(subparsers: Any) -> None:
    """``cnnlens serve``: the interactive explorer in the browser."""
    sv = subparsers.add_parser(
        "serve",
        help="interactive explorer in the browser: explain, network and run views (local web app)",
        description="Start a local web app: upload an image or pick a sample, click through classes, layers and "
        "methods (one capture per image and class serves them all), compare two maps, measure faithfulness, see "
        "filters, feature maps and activation maximisation, and browse the mistakes of `cnnlens run` folders. "
        "Binds 127.0.0.1 (this machine only) unless --host says otherwise.",
    )
    sv.add_argument(
        "--model",
        help="a model to offer besides the zoo models whose weights load offline (as `cnnlens explain --model` "
        "takes it: a zoo name, an architecture with --weights, package.module:factory, file.py:factory); it "
        "becomes the default",
    )
    sv.add_argument("--weights", metavar="PATH", help="checkpoint (state dict) of --model, read with weights_only=True")
    sv.add_argument(
        "--random-weights",
        action="store_true",
        help="also offer the zoo models without offline weights, untrained and labelled 'random weights'",
    )
    sv.add_argument(
        "--run",
        dest="runs",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a finished `cnnlens run` folder to browse in the run view, or a folder of such folders (each run in it "
        "is offered, and runs finished there later open from the page); repeatable; nothing else is listed",
    )
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    sv.add_argument("--cache-size", type=int, default=8, metavar="N", help="recordings kept in memory (default 8; LRU)")
    sv.add_argument(
        "--max-upload-mb", type=float, default=20.0, metavar="MB", help="largest upload accepted (default 20 MB)"
    )
    sv.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"largest image accepted, width x height, checked before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )
    sv.add_argument(
        "--no-warmup",
        action="store_true",
        help="do not extend an image's recording to every offered layer in the background after its first map "
        "(then clicking an earlier layer captures again)",
    )
    sv.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")
    sv.add_argument("--no-browser", action="store_true", help="accepted for scripts; the browser is never opened")
