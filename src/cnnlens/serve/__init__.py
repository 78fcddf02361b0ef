"""``cnnlens serve``: the interactive explorer in the browser (FastAPI back end, static front end).

:func:`cnnlens.serve.app.create_app` builds the app from a :class:`cnnlens.serve.config.ServeConfig`; the
command line (:mod:`cnnlens.cli.serve`) starts it with uvicorn. Modules: :mod:`~cnnlens.serve.config` (settings
and the API error), :mod:`~cnnlens.serve.models` (served models and their locks), :mod:`~cnnlens.serve.images`
(uploads and samples), :mod:`~cnnlens.serve.engine` (cached recordings, explanations, maps, metrics),
:mod:`~cnnlens.serve.render` (PNG/NPY), :mod:`~cnnlens.serve.network` (filters, feature maps),
:mod:`~cnnlens.serve.jobs` (activation maximisation in the background), :mod:`~cnnlens.serve.runs` (the run
view) and :mod:`~cnnlens.serve.app` (the routes). The API is described in ``docs/serve.md``.

Importing this package imports no FastAPI: ``from cnnlens.serve import create_app`` loads it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnlens.serve.config import ApiError, ServeConfig

if TYPE_CHECKING:
    from cnnlens.serve.app import create_app

__all__ = ["ApiError", "ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from cnnlens.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'cnnlens.serve' has no attribute {name!r}")
