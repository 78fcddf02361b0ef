"""``cnnlens serve``'s HTTP API through the ASGI test client: every endpoint, bad uploads, traversal attempts,
unknown ids, the recording cache (reuse, eviction), background jobs, two threads at once and a real run folder.

Tiny networks from ``tests/nets.py`` everywhere except where real predictions matter (the embedded
``efficientnet_lite0`` on the sample photo ``chelsea`` must see a cat).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient
from tests.nets import hook_count

from cnnlens import explain
from cnnlens.models import LoadedModel, load_model
from cnnlens.serve import ApiError, ServeConfig, create_app
from cnnlens.serve import engine as engine_module
from cnnlens.serve.images import read_limited

pytestmark = pytest.mark.filterwarnings("ignore:Grad-CAM\\+\\+ on layer")  # body.3 is pre-ReLU on purpose


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return load_model("tests.nets:GapHead", input_size=[32], mean=[0.5], std=[0.5])


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def upload(client: TestClient, data: bytes, name: str = "x.png") -> Any:
    return client.post("/api/images", files={"file": (name, data, "image/png")})


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "hint"}, body
    assert "Traceback" not in response.text
    return str(body["error"]["code"])


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = ServeConfig(
        models={"tiny": tiny()}, zoo=False, cache_size=3, max_upload_bytes=200_000, max_pixels=250_000, warmup=False
    )
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def image_id(client: TestClient) -> str:
    response = upload(client, png_bytes(48, 40))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (48, 40)
    return str(body["image_id"])


# -- info, page, layers, classes -----------------------------------------------------------------------------
def test_info_lists_models_methods_samples_limits(client: TestClient) -> None:
    info = client.get("/api/info").json()
    assert info["default_model"] == "tiny" and info["models"] == [{"id": "tiny", "label": "tiny", "default": True}]
    methods = {m["id"]: m for m in info["methods"]}
    assert info["default_method"] == "gradcam" and {"gradcam", "gradcampp", "saliency", "scorecam"} <= set(methods)
    relu = {o["name"]: o for o in methods["gradcam"]["options"]}["relu"]
    assert relu["type"] == "bool" and relu["default"] is True
    display = {o["name"]: o for o in methods["saliency"]["options"]}["display"]
    assert display["type"] == "choice" and display["choices"] == ["relu", "abs", "signed"]
    assert methods["saliency"]["scope"] == "input"
    assert {"id": "chelsea", "name": "Chelsea (cat)"} in info["samples"]
    assert "jet" in info["colormaps"] and info["runs"] == []
    assert info["limits"] == {"max_upload_bytes": 200_000, "max_pixels": 250_000}


def test_page_and_unknown_route(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404 and error_code(missing) == "not_found"


def test_layers_and_classes(client: TestClient) -> None:
    body = client.get("/api/layers", params={"model": "tiny"}).json()
    names = [layer["name"] for layer in body["layers"]]
    assert body["default"] == "body" and "body.3" in names and "body.0" not in names  # plain convs left out
    row = body["layers"][names.index("body.3")]
    assert row["role"] == "highest conv" and row["shape"] == [6, 16, 16] and row["stride"] == 2
    assert client.get("/api/classes", params={"q": "S_3"}).json()["classes"] == [{"index": 3, "name": "class_3"}]
    assert len(client.get("/api/classes", params={"limit": 2}).json()["classes"]) == 2
    assert error_code(client.get("/api/layers", params={"model": "nope"})) == "not_found"


# -- uploads -------------------------------------------------------------------------------------------------------
def test_bad_uploads_are_json_errors(client: TestClient) -> None:
    not_image = upload(client, b"hello, this is text", "notes.txt")
    assert not_image.status_code == 400 and error_code(not_image) == "bad_image"
    truncated = upload(client, png_bytes(64, 64)[:300])
    assert truncated.status_code == 400 and error_code(truncated) == "bad_image"
    empty = upload(client, b"")
    assert empty.status_code == 400 and error_code(empty) == "bad_image"
    huge = upload(client, png_bytes(600, 600, seed=1))  # ~1 MB of noise, over the 200 kB limit
    assert huge.status_code == 413 and error_code(huge) == "upload_too_large"
    bomb = Image.new("RGB", (1000, 1000))  # 1e6 pixels in a few kB: over max_pixels=250000
    buf = io.BytesIO()
    bomb.save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    many = upload(client, buf.getvalue())
    assert many.status_code == 400 and error_code(many) == "too_many_pixels"
    no_file = client.post("/api/images", files={"other": ("a.png", png_bytes(8, 8), "image/png")})
    assert no_file.status_code == 400 and error_code(no_file) == "no_file"
    not_multipart = client.post("/api/images", content=png_bytes(8, 8), headers={"content-type": "image/png"})
    assert not_multipart.status_code == 400 and error_code(not_multipart) == "bad_request"


def test_declared_oversized_body_is_refused_from_its_header(client: TestClient) -> None:
    response = client.post(
        "/api/images",
        content=b"x" * 10,
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": "999999999"},
    )
    assert response.status_code == 413 and error_code(response) == "upload_too_large"


def test_streamed_body_without_a_length_is_cut_at_the_limit(client: TestClient) -> None:
    """No Content-Length (chunked): the limit inside the multipart parser refuses it (413, not a parse error)."""
    boundary = "cnnlensboundary"

    def body() -> Iterator[bytes]:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        yield (head + "Content-Type: image/png\r\n\r\n").encode()
        for _ in range(400):  # 400 x 4 kB = 1.6 MB, over the 200 kB limit
            yield b"\x89PNG" + b"x" * 4092
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/api/images", content=body(), headers=headers)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413 and error_code(response) == "upload_too_large"


def test_a_huge_json_body_is_refused(client: TestClient) -> None:
    response = client.post(
        "/api/explain", content=b"{" + b" " * 2_000_000 + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and error_code(response) == "body_too_large"


def test_read_limited_stops_reading_past_the_limit() -> None:
    consumed: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(100):
            consumed.append(i)
            yield b"x" * 1000

    async def drain() -> None:
        async for _ in read_limited(body(), 3500):
            pass

    with pytest.raises(ApiError) as info:
        asyncio.run(drain())
    assert info.value.status == 413 and len(consumed) == 4  # the 4th chunk crossed the limit; no 5th was read


def test_image_png_and_samples(client: TestClient, image_id: str) -> None:
    shown = client.get(f"/api/images/{image_id}.png")
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(shown.content)).size == (32, 32)  # as the model sees it: resized, cropped
    sample = client.post("/api/images/sample", json={"sample": "coffee"})
    assert sample.status_code == 200 and sample.json()["name"] == "Coffee (cup)"
    bad = client.post("/api/images/sample", json={"sample": "../../etc/passwd"})
    assert bad.status_code == 400 and error_code(bad) == "unknown_sample"


# -- explain, maps, cache ----------------------------------------------------------------------------------------
def test_explain_matches_a_direct_explain_call_and_reuses_the_capture(
    client: TestClient, image_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = engine_module.capture

    def counting(module: Any, layers: Any, **kwargs: Any) -> Any:
        calls.append(list(layers))
        return real(module, layers, **kwargs)

    monkeypatch.setattr(engine_module, "capture", counting)
    first = client.post("/api/explain", json={"image_id": image_id, "layer": "body.3", "class_index": 2}).json()
    assert first["cached"] is False and first["class_index"] == 2 and first["layer"] == "body.3"
    assert calls == [["body.3", "body.4"]]  # the requested layer and every offered layer after it
    second = client.post(
        "/api/explain", json={"image_id": image_id, "layer": "body.4", "class_index": 2, "method": "gradcampp"}
    ).json()
    third = client.post(
        "/api/explain",
        json={
            "image_id": image_id,
            "layer": "body.3",
            "class_index": 2,
            "method": "xgradcam",
            "options": {"relu": False},
        },
    ).json()
    assert second["cached"] is True and third["cached"] is True and len(calls) == 1  # no new capture
    assert second["timing_ms"]["capture"] == 0.0 and second["timing_ms"]["total"] < first["timing_ms"]["total"]

    # Oracle: the same maps as cnnlens.explain on the same input.
    model = client.app.state.cnnlens.hub["tiny"].get()  # type: ignore[attr-defined]
    x = client.app.state.cnnlens.images.model_input(image_id, "tiny", model)  # type: ignore[attr-defined]
    direct = explain(
        model,
        x,
        methods=["gradcampp", "xgradcam"],
        layers=["body.4", "body.3"],
        targets=2,
        options={"xgradcam": {"relu": False}},
    )
    for body, method, layer in ((second, "gradcampp", "body.4"), (third, "xgradcam", "body.3")):
        raw = direct[method, layer].raw[:1, :1]
        want = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear")[0, 0].numpy()
        got = np.load(io.BytesIO(client.get(f"/api/maps/{body['map_id']}/map.npy").content))
        assert got.dtype == np.float32 and got.shape == (32, 32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert body["range"] == pytest.approx([float(raw.min()), float(raw.max())], rel=1e-5)
        heat = np.asarray(Image.open(io.BytesIO(client.get(f"/api/maps/{body['map_id']}/heatmap.png").content)))
        assert heat.shape == (32, 32, 3)
    assert hook_count(model.module) == 0


def test_earlier_layer_and_other_class_capture_again(client: TestClient, image_id: str) -> None:
    cache = client.app.state.cnnlens.cache  # type: ignore[attr-defined]
    before = cache.info()["captures"]
    a = client.post("/api/explain", json={"image_id": image_id, "layer": "body.4", "class_index": 1}).json()
    b = client.post(
        "/api/explain", json={"image_id": image_id, "layer": "body.4", "class_index": 1, "method": "layercam"}
    ).json()
    c = client.post("/api/explain", json={"image_id": image_id, "layer": "body.0", "class_index": 1}).json()
    assert (a["cached"], b["cached"], c["cached"]) == (False, True, False)
    assert cache.info()["captures"] == before + 2


def test_warmup_completes_the_recording_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = engine_module.capture

    def counting(module: Any, layers: Any, **kwargs: Any) -> Any:
        calls.append(list(layers))
        return real(module, layers, **kwargs)

    monkeypatch.setattr(engine_module, "capture", counting)
    with TestClient(create_app(ServeConfig(models={"tiny": tiny()}, zoo=False))) as c:
        state = c.app.state.cnnlens  # type: ignore[attr-defined]
        image = upload(c, png_bytes(32, 32, seed=4)).json()["image_id"]
        first = c.post("/api/explain", json={"image_id": image, "layer": "body.4", "class_index": 0}).json()
        assert first["cached"] is False and calls == [["body.4"]]  # the first request records only what it needs
        assert state.engine.prefetch.wait_idle(30)
        assert calls[1:] == [["body.4", "body.3"]] and state.engine.prefetch.completed == 1  # every offered layer
        earlier = c.post("/api/explain", json={"image_id": image, "layer": "body.3", "class_index": 0}).json()
        assert earlier["cached"] is True and len(calls) == 2


def test_pictures_and_layers_do_not_wait_for_a_forward(client: TestClient, image_id: str) -> None:
    served = client.app.state.cnnlens.hub["tiny"]  # type: ignore[attr-defined]
    client.get("/api/layers")  # the catalogue is computed once, under the lock
    answers: list[int] = []

    def ask() -> None:
        answers.append(client.get(f"/api/images/{image_id}.png").status_code)
        answers.append(client.get("/api/layers").status_code)

    with served.lock:  # a long capture holds the model
        t = threading.Thread(target=ask)
        t.start()
        t.join(20)
        assert answers == [200, 200]


def test_map_endpoints(client: TestClient, image_id: str) -> None:
    body = client.post("/api/explain", json={"image_id": image_id}).json()
    top = client.post("/api/predict", json={"image_id": image_id}).json()
    assert body["class_index"] == top["top"][0]["index"] and body["layer"] == "body"  # null class = top class
    assert len(top["top"]) == 5 and top["num_classes"] == 5
    assert sorted((r["score"] for r in top["top"]), reverse=True) == [r["score"] for r in top["top"]]
    map_id = body["map_id"]
    a = client.get(f"/api/maps/{map_id}/overlay.png", params={"colormap": "viridis", "opacity": 0.0})
    shown = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{image_id}.png").content)))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(a.content))), shown)  # opacity 0: the image itself
    b = client.get(f"/api/maps/{map_id}/overlay.png", params={"opacity": 1.0})
    heat = client.get(f"/api/maps/{map_id}/heatmap.png")
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(b.content))), np.asarray(Image.open(io.BytesIO(heat.content)))
    )
    assert client.get(f"/api/maps/{map_id}/signed.png").headers["content-type"] == "image/png"
    manifest = client.get(f"/api/maps/{map_id}/manifest.json").json()
    assert manifest["method"] == "gradcam" and manifest["layer"] == "body" and manifest["options"] == {"relu": True}
    assert manifest["class"]["index"] == body["class_index"] and "model" in manifest
    bad_opacity = client.get(f"/api/maps/{map_id}/overlay.png", params={"opacity": 1.5})
    assert bad_opacity.status_code == 400 and error_code(bad_opacity) == "bad_opacity"
    bad_cmap = client.get(f"/api/maps/{map_id}/heatmap.png", params={"colormap": "no_such_map"})
    assert bad_cmap.status_code == 400 and error_code(bad_cmap) == "bad_colormap"


def test_input_scope_method_and_metrics(client: TestClient, image_id: str) -> None:
    body = client.post("/api/explain", json={"image_id": image_id, "method": "saliency", "layer": "body.3"}).json()
    assert body["layer"] == "input" and body["method"] == "saliency"
    metrics = client.post("/api/metrics", json={"map_id": body["map_id"]}).json()
    assert set(metrics) == {"average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "curves"}
    curves = metrics["curves"]
    assert len(curves["deletion"]) == len(curves["insertion"]) == len(curves["fractions"]) == 17
    assert curves["fractions"][0] == 0.0 and curves["fractions"][-1] == 1.0
    assert 0.0 <= metrics["average_drop"] <= 100.0 and 0.0 <= metrics["deletion_auc"] <= 1.0
    assert metrics["deletion_auc"] == pytest.approx(
        (sum(curves["deletion"]) - curves["deletion"][0] / 2 - curves["deletion"][-1] / 2) / 16
    )


def test_explain_argument_errors(client: TestClient, image_id: str) -> None:
    cases = [
        ({"method": "nope"}, 400, "unknown_method"),
        ({"layer": "../../etc/passwd"}, 400, "unknown_layer"),
        ({"class_index": 99}, 400, "bad_class"),
        ({"class_index": -1}, 400, "bad_class"),
        ({"options": {"alpha": 3}}, 400, "bad_option"),
        ({"options": {"relu": "yes"}}, 400, "bad_option"),
        ({"model": "../tiny"}, 404, "not_found"),
        ({"image_id": "0123abc"}, 404, "not_found"),
        ({"class_index": "two"}, 400, "bad_request"),
    ]
    for extra, status, code in cases:
        response = client.post("/api/explain", json={"image_id": image_id, **extra})
        assert (response.status_code, error_code(response)) == (status, code), extra
    missing = client.post("/api/explain", json={})
    assert missing.status_code == 400 and error_code(missing) == "bad_request"


def test_unknown_ids_and_traversal_attempts_are_404(client: TestClient) -> None:
    paths = [
        "/api/maps/ffff/overlay.png",
        "/api/maps/..%2F..%2Fetc%2Fpasswd/map.npy",
        "/api/images/..%2F..%2Fetc%2Fpasswd.png",
        "/api/images/%2Fetc%2Fpasswd.png",
        "/api/jobs/0000",
        "/api/jobs/..%2F..%2Fetc/result.png",
        "/api/features/abc.png",
        "/api/runs/..%2F..",
        "/api/runs/0/images",
        "/api/maps/../../../etc/passwd",
    ]
    for path in paths:
        response = client.get(path)
        assert response.status_code == 404 and error_code(response) == "not_found", path
    assert client.delete("/api/jobs/0000").status_code == 404


def test_eviction_is_counted_and_reported() -> None:
    config = ServeConfig(models={"tiny": tiny()}, zoo=False, cache_size=2, warmup=False)
    with TestClient(create_app(config)) as c:
        image = upload(c, png_bytes(32, 32, seed=3)).json()["image_id"]
        for k in (0, 1, 2):
            assert c.post("/api/explain", json={"image_id": image, "class_index": k}).json()["cached"] is False
        info = c.get("/api/cache").json()
        assert (info["entries"], info["capacity"], info["evictions"]) == (2, 2, 1)
        assert info["last_evicted"] == f"tiny/{image}/0"
        again = c.post("/api/explain", json={"image_id": image, "class_index": 0, "method": "gradcampp"}).json()
        assert again["cached"] is False and c.get("/api/cache").json()["evictions"] == 2


def test_two_threads_at_once_get_the_sequential_answers(client: TestClient) -> None:
    images = [upload(client, png_bytes(40, 40, seed=10 + i)).json()["image_id"] for i in range(2)]
    results: dict[int, list[Any]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for method in ("gradcam", "gradcampp", "scorecam", "guided_backprop"):
                r = client.post(
                    "/api/explain", json={"image_id": images[i], "method": method, "layer": "body.3", "class_index": 4}
                )
                assert r.status_code == 200, r.text
                results[i].append(np.load(io.BytesIO(client.get(f"/api/maps/{r.json()['map_id']}/map.npy").content)))
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    model = client.app.state.cnnlens.hub["tiny"].get()  # type: ignore[attr-defined]
    for i in range(2):
        x = client.app.state.cnnlens.images.model_input(images[i], "tiny", model)  # type: ignore[attr-defined]
        direct = explain(
            model, x, methods=["gradcam", "gradcampp", "scorecam", "guided_backprop"], layers=["body.3"], targets=4
        )
        for got, exp in zip(results[i], direct, strict=True):
            raw = exp.raw[:1, :1]
            want = raw if raw.shape[-1] == 32 else torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear")
            np.testing.assert_allclose(got, want[0, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert hook_count(model.module) == 0


# -- network view and jobs ---------------------------------------------------------------------------------------
def test_filters_and_features(client: TestClient, image_id: str) -> None:
    filters = client.get("/api/filters.png", params={"layer": "body.0", "max": 4})
    assert filters.status_code == 200 and Image.open(io.BytesIO(filters.content)).mode == "RGB"
    not_conv = client.get("/api/filters.png", params={"layer": "body.2"})
    assert not_conv.status_code == 400 and error_code(not_conv) == "bad_layer"
    body = client.post("/api/features", json={"image_id": image_id, "layer": "body.3", "top": 4}).json()
    scores = [c["score"] for c in body["channels"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True) and body["shape"] == [6, 16, 16]
    model = client.app.state.cnnlens.hub["tiny"].get()  # type: ignore[attr-defined]
    x = client.app.state.cnnlens.images.model_input(image_id, "tiny", model)  # type: ignore[attr-defined]
    with torch.no_grad():
        means = model.module.body[:4](x)[0].mean(dim=(1, 2))
    assert [c["index"] for c in body["channels"]] == means.argsort(descending=True)[:4].tolist()
    assert client.get(body["url"]).headers["content-type"] == "image/png"


def wait_for(client: TestClient, job_id: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {body}")


def test_maximize_job_progress_result_and_cancel(client: TestClient) -> None:
    done = client.post("/api/jobs/maximize", json={"layer": "body.3", "channels": [0, 1], "steps": 4, "size": 32})
    job_id = done.json()["job_id"]
    body = wait_for(client, job_id, {"done", "error"})
    assert body["state"] == "done" and body["progress"] == 1.0 and body["kind"] == "maximize"
    picture = Image.open(io.BytesIO(client.get(body["result_url"]).content))
    assert picture.size == (32 * 2 + 2, 32)  # two 32x32 images side by side, a 2-pixel gap

    long = client.post("/api/jobs/maximize", json={"layer": "body.3", "channels": [0], "steps": 2048, "size": 64})
    job_id = long.json()["job_id"]
    wait_for(client, job_id, {"running"})
    cancelled = client.delete(f"/api/jobs/{job_id}").json()
    assert cancelled["job_id"] == job_id
    body = wait_for(client, job_id, {"cancelled", "done", "error"})
    assert body["state"] == "cancelled" and body["progress"] < 1.0 and body["result_url"] is None
    assert client.get(f"/api/jobs/{job_id}/result.png").status_code == 404
    bad = client.post("/api/jobs/maximize", json={"layer": "body.3", "channels": [], "steps": 4})
    assert bad.status_code == 400 and error_code(bad) == "bad_channels"
    bad = client.post("/api/jobs/maximize", json={"layer": "body.3", "channels": [0], "steps": 0})
    assert bad.status_code == 400 and error_code(bad) == "bad_steps"
    model = client.app.state.cnnlens.hub["tiny"].get()  # type: ignore[attr-defined]
    assert hook_count(model.module) == 0


def test_unexpected_errors_are_json_without_a_trace(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(client.app.state.cnnlens.engine, "predict", broken)  # type: ignore[attr-defined]
    response = client.post("/api/predict", json={"image_id": "x"})
    assert response.status_code == 500 and error_code(response) == "internal_error"
    assert "boom" in response.json()["error"]["message"]


def test_explain_recording_equals_explain_and_refuses_an_unrecorded_layer() -> None:
    from cnnlens.capture import Probe, capture
    from cnnlens.errors import LayerError
    from cnnlens.explain import display_images, explain_recording
    from cnnlens.methods.registry import get_method

    model = tiny(1)
    x = torch.rand(1, 3, 32, 32)
    cap = capture(model.module, ["body.3", "body.4"])
    with cap:
        rec = cap.run(x, 3, gradients=True)
    probe = Probe(cap, rec, rec.targets)
    images = display_images(x, model)
    direct = explain(model, x, methods=["gradcam", "scorecam", "saliency"], layers=["body.3", "body.4"], targets=3)
    with cap:  # re-opened: Score-CAM's and saliency's extra passes run through the probe
        for method, key, layer in (
            ("gradcam", "body.4", "body.4"),
            ("scorecam", "body.3", "body.3"),
            ("saliency", "input", None),
        ):
            spec = get_method(method)
            got = explain_recording(model.module, rec, probe, spec, spec.variant(), key, images=images)
            want = direct[method, layer]
            assert got.layer == want.layer and got.method == method
            torch.testing.assert_close(got.raw, want.raw, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got.maps, want.maps, rtol=1e-5, atol=1e-6)
        with pytest.raises(LayerError, match=r"body\.0"):
            explain_recording(model.module, rec, probe, get_method("gradcam"), {"relu": True}, "body.0", images=images)
    assert hook_count(model.module) == 0


# -- the embedded model --------------------------------------------------------------------------------------------
def test_embedded_model_sees_a_cat_in_chelsea() -> None:
    config = ServeConfig(zoo=True, cache_size=2)
    with TestClient(create_app(config)) as c:
        info = c.get("/api/info").json()
        assert info["default_model"] == "efficientnet_lite0"
        image = c.post("/api/images/sample", json={"sample": "chelsea"}).json()["image_id"]
        top = c.post("/api/predict", json={"image_id": image}).json()["top"]
        assert "cat" in top[0]["name"]
        body = c.post("/api/explain", json={"image_id": image}).json()
        assert body["class_index"] == top[0]["index"] and body["layer"] == "bn2" and body["cached"] is False
        layers = c.get("/api/layers").json()
        assert layers["default"] == "bn2" and [r["name"] for r in layers["layers"] if r["recommended"]] == ["bn2"]


# -- the run view ------------------------------------------------------------------------------------------------------
NET = """
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(num_classes=3):
    import torch

    torch.manual_seed(0)
    return Tiny(num_classes)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cnnlens.runs.__main__ import main as runs_main

    root = tmp_path_factory.mktemp("serve_run")
    (root / "net.py").write_text(NET)
    (root / "classes.txt").write_text("cat\ndog\nfox\n")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    (root / "data" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    out = root / "run"
    args = [
        "run",
        str(root / "data"),
        "--model",
        f"{root / 'net.py'}:build",
        "--input-size",
        "24",
        "--mean",
        "0.5",
        "--std",
        "0.5",
        "--class-names",
        str(root / "classes.txt"),
        "--out",
        str(out),
        "--workers",
        "0",
    ]
    assert runs_main(args) in (0, 1)  # 1: the broken file is reported as an error row
    return out


def test_a_folder_of_runs_offers_each_and_the_page_opens_runs_made_later(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    parent = tmp_path / "runs"
    shutil.copytree(run_dir, parent / "first")
    (parent / "notes").mkdir()  # not a run: not offered
    (parent / "unfinished").mkdir()
    (parent / "unfinished" / "run.json").write_text("{}")  # no results.parquet yet: skipped, not an error
    (parent / "link").symlink_to(run_dir, target_is_directory=True)  # a link may point anywhere: never followed
    with TestClient(create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, runs=[parent]))) as c:
        listed = c.get("/api/info").json()["runs"]
        assert [r["name"] for r in listed] == ["first"] and str(parent) not in json.dumps(listed)
        assert c.post("/api/runs/rescan").json()["runs"] == listed  # nothing new yet
        shutil.copytree(run_dir, parent / "second")  # a run finished after the server started
        found = c.post("/api/runs/rescan").json()
        assert [r["name"] for r in found["runs"]] == ["first", "second"] and found["roots"] == 1
        second = found["runs"][1]["id"]
        assert c.get(f"/api/runs/{second}").json()["n"] == 10
        assert c.post("/api/runs/rescan", json={"path": str(tmp_path)}).json()["runs"] == found["runs"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ApiError, match="neither a finished cnnlens run folder nor a folder holding any"):
        create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, runs=[empty]))
    with pytest.raises(ApiError, match=r"no results\.parquet yet"):
        create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, runs=[parent / "unfinished"]))


def test_run_view_reads_the_run_without_recomputing(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    with TestClient(create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, runs=[run_dir]))) as c:
        monkeypatch.setattr(engine_module, "capture", None)  # nothing here may capture
        (listed,) = c.get("/api/info").json()["runs"]
        assert listed["images"] == len(rows) == 10 and str(run_dir) not in json.dumps(listed)
        run_id = listed["id"]
        summary = c.get(f"/api/runs/{run_id}").json()
        assert summary["n"] == 10 and summary["errors"] == 1 and summary["classes"] == ["cat", "dog", "fox"]
        assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in ok) / len(ok))
        assert summary["methods"] == ["gradcam"] and summary["layers"] == ["features"]
        confusion = np.array(summary["confusion"])
        assert confusion.sum() == 9 and np.trace(confusion) == sum(r["correct"] for r in ok)
        for r in ok:
            assert confusion[r["label"], r["prediction"]] >= 1

        every = c.get(f"/api/runs/{run_id}/images", params={"limit": 100}).json()
        wrong = c.get(f"/api/runs/{run_id}/images", params={"filter": "incorrect"}).json()
        right = c.get(f"/api/runs/{run_id}/images", params={"filter": "correct"}).json()
        assert every["total"] == 10 and wrong["total"] + right["total"] == 9
        assert all(not r["correct"] for r in wrong["rows"]) and all(r["correct"] for r in right["rows"])
        dogs = c.get(f"/api/runs/{run_id}/images", params={"true": 1, "pred": 0}).json()
        assert dogs["total"] == confusion[1, 0]
        page = c.get(f"/api/runs/{run_id}/images", params={"offset": 8, "limit": 5}).json()
        assert page["total"] == 10 and len(page["rows"]) == 2

        error_row = next(r for r in every["rows"] if r["status"] != "ok")
        row = (wrong["rows"] or right["rows"])[0]
        for which in ("pred", "true"):
            picture = c.get(f"/api/runs/{run_id}/images/{row['row_id']}/{which}.png")
            assert picture.status_code == 200 and Image.open(io.BytesIO(picture.content)).size == (24, 24)
            missing = c.get(f"/api/runs/{run_id}/images/{error_row['row_id']}/{which}.png")
            assert missing.status_code == 404 and error_code(missing) == "not_stored"
        original = c.get(f"/api/runs/{run_id}/images/{row['row_id']}/original.png")
        assert original.status_code == 200 and Image.open(io.BytesIO(original.content)).size == (24, 24)
        for bad in ("..%2F..%2Frun.json", "%2Fetc%2Fpasswd", "1%2F..%2F..", "-1", "99", "1.0", "0x1"):
            response = c.get(f"/api/runs/{run_id}/images/{bad}/original.png")
            assert response.status_code == 404 and error_code(response) == "not_found", bad
        assert error_code(c.get(f"/api/runs/{run_id}/images/0/secret.png")) == "not_found"
        assert error_code(c.get(f"/api/runs/{run_id}/images/0/pred.png", params={"pair": "../x"})) == "not_found"
        assert error_code(c.get(f"/api/runs/{run_id}/images", params={"filter": "wrong"})) == "bad_filter"


def test_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ApiError, match="neither a finished cnnlens run folder nor a folder holding any"):
        create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, runs=[tmp_path]))
    with pytest.raises(ApiError, match="does not exist"):
        create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, runs=[tmp_path / "missing"]))
    with pytest.raises(ApiError, match="cache_size"):
        create_app(ServeConfig(models={"tiny": tiny()}, zoo=False, cache_size=0))


# -- the command ---------------------------------------------------------------------------------------------------------
def test_cli_prints_the_url_and_warns_off_loopback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import uvicorn

    from cnnlens.cli import main

    served: list[Any] = []

    def fake_run(self: Any, sockets: Any = None) -> None:
        served.append((self.config.app, sockets[0].getsockname()))

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    # The process's own logging survives: uvicorn's default dictConfig would close every existing handler
    # (under pytest-xdist that closed the worker's capture files and failed every later test of the worker).
    probe = logging.FileHandler(tmp_path / "probe.log")
    logging.getLogger("cnnlens-test-probe").addHandler(probe)
    try:
        assert main(["serve", "--port", "0", "--model", "tests.nets:GapHead", "--cache-size", "3"]) == 0
        assert probe.stream is not None and not probe.stream.closed
    finally:
        logging.getLogger("cnnlens-test-probe").removeHandler(probe)
        probe.close()
    out = capsys.readouterr()
    ((app, (host, port)),) = served
    assert host == "127.0.0.1" and port > 0 and f"http://127.0.0.1:{port}/" in out.out and "warning" not in out.err
    assert app.state.cnnlens.hub.default == "custom" and app.state.cnnlens.cache.capacity == 3
    assert main(["serve", "--port", "0", "--host", "0.0.0.0", "--model", "tests.nets:GapHead"]) == 0
    assert "warning" in capsys.readouterr().err
    assert main(["serve", "--run", "/no/such/run/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err
