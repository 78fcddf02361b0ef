"""``cnnlens serve``: build the :class:`~cnnlens.serve.config.ServeConfig`, start uvicorn, print the URL."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from cnnlens.cli import common
from cnnlens.errors import UsageError

__all__ = ["cmd_serve"]

log = logging.getLogger("cnnlens.serve")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), handed to uvicorn so the real port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port (0: any free one)."
        ) from exc
    sock.listen(128)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the server and block until it is stopped (Ctrl+C)."""
    import uvicorn

    from cnnlens.serve.app import create_app
    from cnnlens.serve.config import ApiError, ServeConfig

    if args.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be positive, got {args.max_upload_mb}.")
    if args.cache_size < 1:
        raise UsageError(f"--cache-size must be at least 1, got {args.cache_size}.")
    config = ServeConfig(
        model=args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        runs=list(args.runs),
        host=args.host,
        port=args.port,
        cache_size=args.cache_size,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        device=common._device(args.device),
        warmup=not args.no_warmup,
    )
    try:
        app = create_app(config)
    except ApiError as exc:
        raise UsageError(f"{exc.message} {exc.hint}".strip()) from exc
    if not config.loopback:
        common.err_console.print(
            f"[bold yellow]warning:[/] binding {args.host}: anyone who can reach this machine can use the server "
            "(it has no login). Use the default --host 127.0.0.1 unless you mean it.",
            highlight=False,
        )
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    common.console.print(f"cnnlens serve: http://{shown}:{port}/  (Ctrl+C stops it)", highlight=False)
    # log_config=None: uvicorn's own dictConfig would close and replace every logging handler of the process
    # (the caller's too, e.g. a notebook's or a test runner's); its loggers get one stderr handler instead.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(handler)
    uvicorn_log.propagate = False
    try:
        config_ = uvicorn.Config(app, log_config=None, log_level="info" if args.verbose else "warning", lifespan="on")
        uvicorn.Server(config_).run(sockets=[sock])
    finally:
        sock.close()
        uvicorn_log.removeHandler(handler)
        uvicorn_log.propagate = True
    return 0
