"""The FastAPI application of ``cnnlens serve``: :func:`create_app`.

Every route is under ``/api`` (see ``docs/serve.md`` for the table); the page is ``GET /`` and its files are
under ``/static``. Errors are JSON ``{"error": {"code", "message", "hint"}}`` with a 4xx/5xx status, never a
stack trace (unexpected ones are logged with their trace on the server). Routes that compute are plain
``def`` functions, run by Starlette in its thread pool, so two tabs are served at once; each model's
forwards and backwards take turns under its lock (:mod:`cnnlens.serve.models`).

Example:
    >>> from fastapi.testclient import TestClient  # doctest: +SKIP
    >>> client = TestClient(create_app(ServeConfig()))  # doctest: +SKIP
    >>> client.get("/api/info").json()["default_method"]  # doctest: +SKIP
    'gradcam'
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Receive, Scope, Send

from cnnlens._names import __version__
from cnnlens.explain import display_images
from cnnlens.methods.registry import iter_methods
from cnnlens.serve.cache import MapStore, RecordingCache
from cnnlens.serve.config import ApiError, ServeConfig
from cnnlens.serve.engine import Engine
from cnnlens.serve.images import SAMPLES, ImageStore, read_limited, too_large
from cnnlens.serve.jobs import JobManager
from cnnlens.serve.models import ModelHub, layer_role
from cnnlens.serve.network import NetworkViews
from cnnlens.serve.prefetch import Prefetcher
from cnnlens.serve.render import COLORMAPS, heatmap_png, npy_bytes, overlay_png, png, signed_png
from cnnlens.serve.runs import RunCatalog

__all__ = ["ServeState", "create_app", "method_infos"]

log = logging.getLogger("cnnlens.serve")

MULTIPART_OVERHEAD = 64 * 1024
"""Bytes a multipart body may carry beyond the file itself (boundaries, part headers, the file name)."""

PNG = "image/png"

MAX_JSON_BYTES = 1024 * 1024
"""Largest JSON request body (every request but the upload is a few hundred bytes)."""


class ExplainRequest(BaseModel):
    """``POST /api/explain``."""

    image_id: str
    model: str | None = None
    class_index: int | None = None
    layer: str | None = None
    method: str = "gradcam"
    options: dict[str, Any] = Field(default_factory=dict)


class ImageModelRequest(BaseModel):
    """``POST /api/predict``."""

    image_id: str
    model: str | None = None


class SampleRequest(BaseModel):
    """``POST /api/images/sample``."""

    sample: str


class MetricsRequest(BaseModel):
    """``POST /api/metrics``."""

    map_id: str


class FeaturesRequest(BaseModel):
    """``POST /api/features``."""

    image_id: str
    model: str | None = None
    layer: str | None = None
    top: int = 16


class MaximizeRequest(BaseModel):
    """``POST /api/jobs/maximize``."""

    model: str | None = None
    layer: str | None = None
    channels: list[int] = Field(default_factory=lambda: [0])
    steps: int = 64
    size: int = 128


def method_infos() -> list[dict[str, Any]]:
    """Every registered method with its scope and typed options (``methods`` of ``GET /api/info``)."""
    kinds = {bool: "bool", int: "int", float: "float", str: "str"}
    out = []
    for spec in iter_methods():
        options = []
        for name, default in spec.variant({}).items():
            if name == "display":
                options.append(
                    {
                        "name": name,
                        "type": "choice",
                        "default": default,
                        "choices": ["relu", "abs", "signed"],
                        "help": "how the raw map is shown",
                    }
                )
                continue
            kind = kinds.get(type(default), "str")
            help_text = "ReLU the raw map before display (CAM convention)" if name == "relu" else ""
            options.append({"name": name, "type": kind, "default": default, "choices": None, "help": help_text})
        out.append(
            {"id": spec.id, "name": spec.title, "scope": spec.scope, "summary": spec.summary, "options": options}
        )
    return out


class ServeState:
    """Everything one app holds: models, images, caches, jobs, runs (``app.state.cnnlens``)."""

    def __init__(self, config: ServeConfig) -> None:
        config.check()
        self.config = config
        self.hub = ModelHub(config)
        self.images = ImageStore(config.max_images, config.max_pixels)
        self.cache = RecordingCache(config.cache_size)
        self.maps = MapStore(config.max_maps)
        self.engine = Engine(self.hub, self.images, self.cache, self.maps)
        if config.warmup:
            self.engine.prefetch = Prefetcher(self.engine.complete)
        self.jobs = JobManager(self.hub)
        self.network = NetworkViews(self.hub, self.images)
        self.runs = RunCatalog(config.runs)

    def info(self) -> dict[str, Any]:
        """``GET /api/info``."""
        return {
            "version": __version__,
            "models": [
                {"id": m.id, "label": m.label, "default": m.id == self.hub.default} for m in self.hub.models.values()
            ],
            "default_model": self.hub.default,
            "methods": method_infos(),
            "default_method": "gradcam",
            "samples": [{"id": key, "name": name} for key, name in SAMPLES.items()],
            "colormaps": list(COLORMAPS),
            "runs": self.runs.listing(),
            "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels},
        }


class JsonBodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes (declared length) is refused with 413, except uploads.

    The upload route has its own limit (``ServeConfig.max_upload_bytes``), enforced while the body arrives.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/api/images":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                error = ApiError(
                    "body_too_large",
                    f"the request body is {int(length):,} bytes, over {self.limit:,} bytes.",
                    "send the JSON the API table describes; upload images with POST /api/images.",
                    413,
                )
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _static_dir() -> Path:
    return Path(str(resources.files("cnnlens.serve") / "static"))


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app of ``cnnlens serve`` (run it with uvicorn, or test it with ``TestClient``).

    Args:
        config: What to serve; default :class:`ServeConfig` (the zoo models with offline weights, no runs).

    Raises:
        ApiError: A bad config (no model to serve, a run folder that is not a finished run...).
    """
    state = ServeState(config or ServeConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.jobs.shutdown()
        if state.engine.prefetch is not None:
            state.engine.prefetch.stop()

    app = FastAPI(
        title="cnnlens",
        version=__version__,
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.cnnlens = state

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(
            ApiError(
                "bad_request", f"{where}: {first.get('msg', 'invalid request')}", "see the API table in docs/serve.md."
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else "http"
        return _error(ApiError(code, str(exc.detail), "see the API table in docs/serve.md.", exc.status_code))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return _error(
            ApiError(
                "internal_error",
                f"unexpected {type(exc).__name__}: {exc}",
                "see the server log; report it if it persists.",
                500,
            )
        )

    static = _static_dir()
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")

    app.add_middleware(JsonBodyLimit, limit=MAX_JSON_BYTES)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = static / "index.html"
        if not page.is_file():
            return Response(
                "<!doctype html><title>cnnlens</title><p>cnnlens serve: the page is missing.</p>",
                media_type="text/html",
            )
        return FileResponse(page, media_type="text/html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return state.info()

    # -- images ----------------------------------------------------------------------------------------
    @app.post("/api/images")
    async def upload(request: Request) -> dict[str, Any]:
        limit = state.config.max_upload_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
            raise too_large(limit, f"{int(length):,}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                "bad_request",
                "send the image as multipart/form-data with the field 'file'.",
                "e.g. curl -F file=@photo.jpg URL/api/images.",
            )
        stream = read_limited(request.stream(), limit + MULTIPART_OVERHEAD)
        parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError("bad_request", f"malformed multipart body: {exc.message}", "send one field 'file'.") from exc
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError("no_file", "the request has no file field 'file'.", "send the image as field 'file'.")
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise too_large(limit, f"more than {limit:,}")
            image = await run_in_threadpool(state.images.add_bytes, data, upload.filename or "upload")
        finally:
            await form.close()
        h, w = image.pixels.shape[:2]
        return {"image_id": image.id, "name": image.name, "width": w, "height": h}

    @app.post("/api/images/sample")
    def sample(body: SampleRequest) -> dict[str, Any]:
        image = state.images.add_sample(body.sample)
        h, w = image.pixels.shape[:2]
        return {"image_id": image.id, "name": image.name, "width": w, "height": h}

    @app.get("/api/images/{image_id}.png")
    def image_png(image_id: str, model: str | None = None) -> Response:
        served = state.hub[model]
        x = state.images.model_input(image_id, served.id, served.get())
        return Response(png(display_images(x, served.get())[0].numpy()), media_type=PNG)

    # -- predictions, classes, layers --------------------------------------------------------------------
    @app.post("/api/predict")
    def predict(body: ImageModelRequest) -> dict[str, Any]:
        return state.engine.predict(body.model_dump())

    @app.get("/api/classes")
    def classes(model: str | None = None, q: str = "", limit: int = Query(20, ge=1, le=2000)) -> dict[str, Any]:
        names = state.hub[model].get().class_names
        needle = q.strip().lower()
        found = [{"index": i, "name": n} for i, n in enumerate(names) if needle in n.lower()]
        return {"classes": found[:limit], "total": len(found)}

    @app.get("/api/layers")
    def layers(model: str | None = None) -> dict[str, Any]:
        served = state.hub[model]
        default = served.default_layer()
        return {
            "layers": [
                {
                    "name": c.name,
                    "role": layer_role(c),
                    "roles": list(c.roles),
                    "shape": list(c.shape),
                    "stride": c.stride,
                    "recommended": c.name == default,
                }
                for c in served.strip()
            ],
            "default": default,
        }

    # -- explanations and maps -----------------------------------------------------------------------------
    @app.post("/api/explain")
    def explain(body: ExplainRequest) -> dict[str, Any]:
        return state.engine.explain(body.model_dump())

    @app.get("/api/maps/{map_id}/overlay.png")
    def overlay(map_id: str, colormap: str = "jet", opacity: float = 0.5) -> Response:
        record = state.maps.get(map_id)
        return Response(overlay_png(record.image, record.map01, colormap, opacity), media_type=PNG)

    @app.get("/api/maps/{map_id}/heatmap.png")
    def heatmap(map_id: str, colormap: str = "jet") -> Response:
        return Response(heatmap_png(state.maps.get(map_id).map01, colormap), media_type=PNG)

    @app.get("/api/maps/{map_id}/signed.png")
    def signed(map_id: str) -> Response:
        return Response(signed_png(state.maps.get(map_id).signed), media_type=PNG)

    @app.get("/api/maps/{map_id}/map.npy")
    def map_npy(map_id: str) -> Response:
        record = state.maps.get(map_id)
        headers = {"Content-Disposition": f'attachment; filename="{record.method}_{record.class_index}.npy"'}
        return Response(npy_bytes(record.signed), media_type="application/octet-stream", headers=headers)

    @app.get("/api/maps/{map_id}/manifest.json")
    def manifest(map_id: str) -> dict[str, Any]:
        return state.maps.get(map_id).manifest

    @app.post("/api/metrics")
    def metrics(body: MetricsRequest) -> dict[str, Any]:
        return state.engine.metrics(body.map_id)

    # -- network view ----------------------------------------------------------------------------------
    @app.get("/api/filters.png")
    def filters_png(model: str | None = None, layer: str | None = None, max: int = 64) -> Response:
        return Response(state.network.filters_png(model, layer, max), media_type=PNG)

    @app.post("/api/features")
    def features(body: FeaturesRequest) -> dict[str, Any]:
        return state.network.features(body.model_dump())

    @app.get("/api/features/{feat_id}.png")
    def feature_png(feat_id: str) -> Response:
        return Response(state.network.picture(feat_id), media_type=PNG)

    @app.post("/api/jobs/maximize")
    def maximize(body: MaximizeRequest) -> dict[str, Any]:
        return {"job_id": state.jobs.maximize(body.model_dump()).id}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return state.jobs.get(job_id).body()

    @app.delete("/api/jobs/{job_id}")
    def cancel(job_id: str) -> dict[str, Any]:
        return state.jobs.cancel(job_id).body()

    @app.get("/api/jobs/{job_id}/result.png")
    def job_result(job_id: str) -> Response:
        found = state.jobs.get(job_id)
        if found.result is None:
            raise ApiError(
                "not_ready", f"job {job_id} is {found.state}; it has no result.", "wait until its state is done.", 404
            )
        return Response(found.result, media_type=PNG)

    # -- run view --------------------------------------------------------------------------------------
    @app.post("/api/runs/rescan")
    def runs_rescan() -> dict[str, Any]:
        return {"runs": state.runs.rescan(), "roots": len(state.runs.roots)}

    @app.get("/api/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        return state.runs[run_id].summary()

    @app.get("/api/runs/{run_id}/images")
    def run_images(
        run_id: str,
        filter: str = "all",
        true: int | None = None,
        pred: int | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> dict[str, Any]:
        return state.runs[run_id].images(filter, true, pred, offset, limit)

    @app.get("/api/runs/{run_id}/images/{row_id}/original.png")
    def run_original(run_id: str, row_id: str) -> Response:
        return Response(png(state.runs[run_id].original(row_id, state.config.max_pixels)), media_type=PNG)

    @app.get("/api/runs/{run_id}/images/{row_id}/{which}.png")
    def run_map(run_id: str, row_id: str, which: str, pair: str | None = None) -> Response:
        picture = state.runs[run_id].map_picture(row_id, which, pair, state.config.max_pixels)
        if isinstance(picture, Path):
            from cnnlens.data.images import load_image

            return Response(png(load_image(picture)), media_type=PNG)
        return Response(png(picture), media_type=PNG)

    @app.get("/api/cache")
    def cache() -> dict[str, Any]:
        return state.cache.info()

    return app
