"""``explainer serve``: the HTTP API against the library's own answers, its limits under abuse, graceful
shutdown of the real server, and the page driven in headless Chromium.

Truth is always the library called directly on the same pixels (``net.top_k``, the registry's methods,
``explainer.overlay``), never the service's earlier answers.
"""
import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("python_multipart", reason="python-multipart is not installed: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import explainer  # noqa: E402
from explainer.methods.registry import get_method, list_methods  # noqa: E402
from explainer.serve import Settings, create_app  # noqa: E402

TOKEN = "s3cret-token-for-tests"


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What an image file holds, decoded independently of the service."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def map_of(entry: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["data"]), "<f2").reshape(entry["shape"])


def assert_same_map(served: np.ndarray, expected: np.ndarray, method: str):
    """The served float16 map is the library's float32 map rounded once. Occlusion's 'auto' incremental
    path gives float32 maps that differ by up to about 1e-6 from call to call, so its maps are compared
    to within that (and a float16 step); the other methods are deterministic and compared exactly."""
    if method == "occlusion":
        np.testing.assert_allclose(served.astype(np.float32), expected, rtol=2 ** -10, atol=1e-5)
    else:
        np.testing.assert_array_equal(served, expected.astype(np.float16))


def png_of(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as img:
        return np.asarray(img)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with almost no data: what a decompression bomb
    shows a decoder first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(chelsea, coffee):
    return {"chelsea.png": encode(chelsea), "coffee.jpg": encode(coffee, "JPEG")}


@pytest.fixture(scope="module")
def client(default_net):
    with TestClient(create_app(default_net, Settings(time_limit=60))) as c:
        yield c


def upload(data: bytes, name: str = "image.png"):
    return {"image": (name, data, "application/octet-stream")}


def assert_error(response, status: int, kind: str, match: str = ""):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["type"] == kind and body["status"] == status, body
    assert match.lower() in body["message"].lower(), body["message"]


# the API, equal to the library ---------------------------------------------------------------------
def test_model_and_methods_come_from_the_model_and_the_registry(client, default_net):
    model = client.get("/v1/model").json()
    assert model["name"] == default_net.name and model["classes"]["names"] == default_net.class_names
    assert (model["input"]["height"], model["input"]["width"]) == default_net.input_size
    assert model["preprocessing"]["mean"] == list(default_net.preprocessing.mean)
    methods = client.get("/v1/methods").json()["methods"]
    assert [m["name"] for m in methods] == [m.name for m in list_methods()]
    for served, method in zip(methods, list_methods()):
        declared = {o["name"]: o for o in method.as_dict()["options"]}
        for option in served["options"]:
            assert option["allowed"] == declared[option["name"]]["allowed"]
            if option["name"] != "random_state":
                assert option["default"] == declared[option["name"]]["default"]
        assert {o["name"] for o in served["options"]} == set(declared) - {"verbose", "batch_size"}
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_classify_equals_top_k(client, default_net, images):
    for name, data in images.items():
        truth = [p._asdict() for p in default_net.top_k(decoded(data), 5)]
        by_upload = client.post("/v1/classify", files=upload(data, name), data={"k": "5"})
        by_json = client.post("/v1/classify", json={"image": base64.b64encode(data).decode(), "k": 5})
        assert by_upload.status_code == by_json.status_code == 200, by_upload.text
        assert by_upload.json()["predictions"] == truth == by_json.json()["predictions"]
        assert by_upload.headers["x-request-id"]


def test_explain_maps_equal_the_library(client, default_net, images):
    data = images["chelsea.png"]
    image = decoded(data)
    options = {"occlusion": {"stride": "32"}, "rise": {"num_masks": 100, "grid_size": 5}}
    response = client.post("/v1/explain", files=upload(data), data={
        "methods": "gradcam,occlusion,rise", "labels": "285,tiger cat", "options": json.dumps(options),
        "outputs": "maps,overlays,heatmaps"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [l["index"] for l in body["labels"]] == [285, 282]
    probabilities = default_net.predict(image)
    assert [l["score"] for l in body["labels"]] == [float(probabilities[285]), float(probabilities[282])]
    truth = {"gradcam": explainer.gradcam(default_net, image, [285, 282]),
             "occlusion": get_method("occlusion")(default_net, image, [285, 282], stride=32),
             "rise": explainer.rise(default_net, image, [285, 282], num_masks=100, grid_size=5, random_state=0)}
    assert [(m["method"], m["label"]["index"]) for m in body["maps"]] == \
        [(name, i) for name in truth for i in (285, 282)]
    for entry in body["maps"]:
        expected = truth[entry["method"]][[285, 282].index(entry["label"]["index"])]
        assert entry["shape"] == list(image.shape[:2]) and entry["dtype"] == "float16"
        assert_same_map(map_of(entry), expected, entry["method"])
        assert entry["min"] == pytest.approx(float(expected.min())) and entry["max"] == pytest.approx(float(expected.max()))
        if entry["method"] != "occlusion":  # (its colours may differ by one level where its maps differ)
            np.testing.assert_array_equal(png_of(entry["overlay_png"]), explainer.overlay(image, expected, alpha=0.5))
            np.testing.assert_array_equal(png_of(entry["heatmap_png"]), explainer.overlay(image, expected, alpha=1.0))
    assert set(body["timings"]["methods"]) == set(truth) and body["timings"]["work_s"] > 0


def test_explain_json_top_k_and_aliases(client, default_net, images):
    data = images["coffee.jpg"]
    image = decoded(data)
    response = client.post("/v1/explain", json={"image": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
                                                "methods": ["saliency"], "labels": "top2", "outputs": ["maps"]})
    assert response.status_code == 200, response.text
    top = [p.index for p in default_net.top_k(image, 2)]
    body = response.json()
    assert [m["label"]["index"] for m in body["maps"]] == top and body["maps"][0]["method"] == "gradient"
    assert "overlay_png" not in body["maps"][0]
    truth = explainer.saliency(default_net, image, top)
    for entry, expected in zip(body["maps"], truth):
        np.testing.assert_array_equal(map_of(entry), expected.astype(np.float16))


# abuse: typed 4xx, never 500 -------------------------------------------------------------------------
def test_hostile_requests_get_typed_4xx(client, images):
    png, b64 = images["chelsea.png"], base64.b64encode(images["chelsea.png"]).decode()

    def explain(**fields):
        return client.post("/v1/explain", json={"image": b64, **fields})

    cases = [
        (explain(methods=["gradcan"]), 422, "InvalidParameterError", "did you mean gradcam"),
        (explain(labels=["tabbby"]), 422, "UnknownClassError", "closest: 'tabby'"),
        (explain(labels=[1000]), 422, "UnknownClassError", "[0, 999]"),
        (explain(labels="top50"), 422, "InvalidParameterError", "1 to 10"),
        (explain(labels=list(range(11))), 422, "InvalidParameterError", "at most 10"),
        (explain(methods=["occlusion"], options={"occlusion": {"strid": 4}}), 422, "InvalidParameterTypeError",
         "did you mean stride"),
        (explain(methods=["occlusion"], options={"occlusion": {"stride": -3}}), 422, "InvalidParameterError", "stride"),
        (explain(methods=["rise"], options={"rise": {"num_masks": 10 ** 6}}), 422, "InvalidParameterError",
         "at most 10000"),
        (explain(methods=["rise"], options={"rise": {"batch_size": 65536}}), 422, "InvalidParameterError",
         "set by the service"),
        (explain(methods=["integrated_gradients"], options={"integrated_gradients": {"baseline": "/etc/passwd"}}),
         422, "InvalidParameterError", "cannot name files"),
        (explain(methods=["integrated_gradients"], options={"integrated_gradients": {"baseline": "sample:coffee"}}),
         422, "InvalidParameterError", "cannot name files"),
        (explain(methods=["gradcam"], options={"lime": {"num_samples": 10}}), 422, "InvalidParameterError",
         "does not ask for"),
        (explain(methods=["gradcam"], options={"gradcam": {"feature_layer": "no such layer"}}), 422,
         "UnknownLayerError", "unknown layer"),
        (explain(alpha=2), 422, "InvalidParameterError", "alpha"),
        (explain(cmap="nope"), 422, "InvalidParameterError", "cmap"),
        (explain(outputs=["maps", "pdf"]), 422, "InvalidParameterError", "outputs"),
        (explain(path="/etc/passwd"), 422, "InvalidParameterError", "extra inputs"),
        (client.post("/v1/explain", json={"image": "not base64!"}), 422, "InvalidImageError", "base64"),
        (client.post("/v1/explain", json={"image": base64.b64encode(b"GIF89a garbage").decode()}), 422,
         "InvalidImageError", "image"),
        (client.post("/v1/explain", files=upload(png[: len(png) // 3])), 422, "InvalidImageError", "truncated"),
        (client.post("/v1/explain", files=upload(b"%PDF-1.4 not an image")), 422, "InvalidImageError", "allowed format"),
        (client.post("/v1/explain", files=upload(b"")), 422, "InvalidImageError", "empty"),
        (client.post("/v1/explain", files=upload(bomb_png(100_000, 100_000))), 413, "ResourceLimitError", "pixels"),
        (client.post("/v1/classify", files=upload(bomb_png(5000, 4000))), 413, "ResourceLimitError", "at most 16000000"),
        (client.post("/v1/classify", files=upload(png), data={"k": "0"}), 422, "InvalidParameterError", "k"),
        (client.post("/v1/classify", files=upload(png), data={"path": "/etc/passwd"}), 422, "InvalidParameterError",
         "not a field"),
        (client.post("/v1/classify", data={"k": "3"}), 400, "BadRequest", "no 'image'"),
        (client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 400,
         "BadRequest", "not valid JSON"),
        (client.post("/v1/classify", content=png, headers={"content-type": "image/png"}), 415, "BadRequest",
         "multipart"),
        (client.post("/v1/classify", files=upload(png), headers={"X-Time-Limit": "soon"}), 422,
         "InvalidParameterError", "X-Time-Limit"),
        (client.post("/v1/classify", files=upload(png), headers={"X-Time-Limit": "600"}), 422,
         "InvalidParameterError", "(0, 60]"),
        (client.get("/v1/nothing"), 404, "NotFound", ""),
        (client.get("/v1/explain"), 405, "MethodNotAllowed", ""),
    ]
    for response, status, kind, match in cases:
        assert_error(response, status, kind, match)


def test_token_and_body_limit(default_net, images, monkeypatch):
    from explainer.serve.cli import add_arguments, settings_from

    settings = Settings(token=TOKEN, max_body_bytes=64 << 10, max_output_pixels=200_000)
    with TestClient(create_app(default_net, settings, warmup=False)) as c:
        assert_error(c.get("/v1/model"), 401, "Unauthorized", "Authorization: Bearer")
        assert c.get("/v1/model").headers["www-authenticate"].startswith("Bearer")
        assert_error(c.get("/v1/model", headers={"Authorization": "Bearer wrong-token"}), 401, "Unauthorized", "not")
        assert_error(c.post("/v1/classify", files=upload(images["chelsea.png"])), 401, "Unauthorized", "")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/v1/model", headers=auth).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # open: no answers there
        big = images["chelsea.png"]
        assert len(big) > 64 << 10
        assert_error(c.post("/v1/classify", files=upload(big), headers=auth), 413, "PayloadTooLarge", "at most 65536")
        chunks = (big[i:i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: counted as it arrives
        assert_error(c.post("/v1/classify", content=chunks, headers={**auth, "content-type": "image/png"}),
                     413, "PayloadTooLarge", "at most")
        small = encode(np.asarray(Image.fromarray(decoded(images["coffee.jpg"])).resize((120, 80))))
        fits = c.post("/v1/explain", files=upload(small), data={"labels": "top3", "methods": "gradient,gradcam"},
                      headers=auth)  # 6 maps of 120 x 80 = 57600 map pixels: within the limit
        assert fits.status_code == 200 and len(fits.json()["maps"]) == 6, fits.text
        wide = encode(np.zeros((300, 400, 3), np.uint8))  # 2 maps of 120000 pixels: over 200000
        assert_error(c.post("/v1/explain", files=upload(wide), data={"labels": "top2", "methods": "gradient"},
                            headers=auth), 413, "ResourceLimitError", "--max-output-pixels")
        ok = c.post("/v1/classify", files=upload(small), headers=auth)
        assert ok.status_code == 200 and ok.json()["predictions"] == \
            [p._asdict() for p in default_net.top_k(decoded(small), 5)]
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("EXPLAINER_SERVE_TOKEN", TOKEN)
    args = parser.parse_args([])
    assert args.host == "127.0.0.1" and settings_from(args).token == TOKEN
    with pytest.raises(explainer.errors.InvalidParameterError, match="8 characters"):
        settings_from(parser.parse_args(["--token", "short"]))


def _wait(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_overload_503_time_limit_and_cancellation(default_net, images):
    """One worker, no queue: a second request is refused at once with Retry-After; the long one is
    answered 503 at the time limit it asked for (X-Time-Limit) and really stops (its worker is free
    again soon after), and its progress could be followed while it ran."""
    slow = {"image": base64.b64encode(images["chelsea.png"]).decode(), "methods": ["rise"],
            "options": {"rise": {"num_masks": 10000}}}  # about two minutes of forward passes on 2 cores
    with TestClient(create_app(default_net, Settings(workers=1, queue=0), warmup=False)) as c:
        answers = {}
        worker = threading.Thread(target=lambda: answers.setdefault("slow", c.post(
            "/v1/explain", json=slow, headers={"X-Request-Id": "the-slow-one", "X-Time-Limit": "3"})))
        started = time.monotonic()
        worker.start()
        assert _wait(lambda: c.get("/v1/progress/the-slow-one").json().get("done", 0) > 0)
        progress = c.get("/v1/progress/the-slow-one").json()
        assert progress["stage"] == "rise" and progress["total"] == 10000 and 0 < progress["done"] < 10000
        refused = c.post("/v1/classify", files=upload(images["chelsea.png"]))
        assert_error(refused, 503, "ServiceUnavailable", "busy")
        assert int(refused.headers["retry-after"]) >= 1
        worker.join(30)
        assert_error(answers["slow"], 503, "TimeLimitExceeded", "cancelled")
        assert 3.0 <= time.monotonic() - started < 10
        assert _wait(lambda: c.get("/healthz").json()["pool"]["held"] == 0, 10)  # the work stopped
        pool = c.get("/healthz").json()["pool"]
        assert pool["cancelled"] == 1 and pool["refused"] == 1
        assert_error(c.get("/v1/progress/the-slow-one"), 404, "NotFound", "")
        fine = c.post("/v1/classify", files=upload(images["chelsea.png"]))  # and serves again
        assert fine.json()["predictions"] == [p._asdict() for p in default_net.top_k(decoded(images["chelsea.png"]), 5)]


def test_concurrent_requests_all_correct(default_net, images):
    """Gradient and forward-only methods at once from several clients: each answer is the library's."""
    image = decoded(images["chelsea.png"])
    truth = {"gradcam": explainer.gradcam(default_net, image, 285),
             "guided_backprop": explainer.guided_backprop(default_net, image, 285),
             "occlusion": get_method("occlusion")(default_net, image, 285, stride=32)}
    with TestClient(create_app(default_net, Settings(workers=2, queue=16), warmup=False)) as c:
        def ask(method):
            return method, c.post("/v1/explain", files=upload(images["chelsea.png"]), data={
                "methods": method, "labels": "285", "outputs": "maps",
                "options": json.dumps({"occlusion": {"stride": 32}} if method == "occlusion" else {})})

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, list(truth) * 2))
    for method, response in answers:
        assert response.status_code == 200, response.text
        assert_same_map(map_of(response.json()["maps"][0]), truth[method], method)


def test_page_and_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/model", "/v1/methods", "/v1/classify", "/v1/explain", "/healthz"} <= set(schema["paths"])
    colourbar = client.get("/v1/colourbar", params={"height": 64})
    assert colourbar.headers["content-type"] == "image/png"
    bar = np.asarray(Image.open(io.BytesIO(colourbar.content)))
    assert bar.shape == (64, 12, 3) and bar[0, 0, 0] > bar[0, 0, 2] and bar[-1, 0, 2] > bar[-1, 0, 0]  # red top


# the real server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_graceful_shutdown_and_access_log(images, default_net):
    """``python -m explainer.serve`` on loopback: an explanation in flight when SIGTERM arrives is
    still answered (and correct), the process then shuts down cleanly, and every request left one
    JSON line in the access log."""
    import httpx

    port = _free_port()
    env = {**os.environ, "EXPLAINER_SERVE_TOKEN": TOKEN}
    server = subprocess.Popen([sys.executable, "-m", "explainer.serve", "--port", str(port), "--workers", "1"],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert _wait(lambda: _get(base + "/healthz") == 200, 60), "the server did not start"
        answers = {}
        request = {"image": base64.b64encode(images["chelsea.png"]).decode(), "methods": ["occlusion"],
                   "labels": [285], "options": {"occlusion": {"stride": 24}}, "outputs": ["maps"]}
        flight = threading.Thread(target=lambda: answers.setdefault("r", httpx.post(
            base + "/v1/explain", json=request, headers={**auth, "X-Request-Id": "in-flight"}, timeout=60)))
        flight.start()
        assert _wait(lambda: httpx.get(base + "/v1/progress/in-flight", headers=auth).status_code == 200, 20)
        server.send_signal(signal.SIGTERM)
        flight.join(60)
        server.wait(30)  # uvicorn re-raises the SIGTERM it handled once it has shut down
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stderr.read()
    assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[-2000:]
    response = answers["r"]
    assert response.status_code == 200, response.text
    truth = get_method("occlusion")(default_net, decoded(images["chelsea.png"]), 285, stride=24)
    assert_same_map(map_of(response.json()["maps"][0]), truth, "occlusion")
    access = [json.loads(line) for line in log.splitlines() if line.startswith("{") and '"access"' in line]
    explain = [a for a in access if a["path"] == "/v1/explain"]
    assert explain and explain[0]["status"] == 200 and explain[0]["request_id"] == "in-flight"
    assert {"ts", "client", "method", "status", "duration_ms", "bytes_in", "bytes_out"} <= set(explain[0])
    assert all(a["status"] != 500 for a in access)


def _get(url) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


# the page in a real browser --------------------------------------------------------------------
def _browser_tools():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return None, None, "selenium is not installed (pip install -e '.[dev]')"
    if chromium is None or driver is None:
        return None, None, "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
    return chromium, driver, ""


@pytest.fixture(scope="module")
def live_server(default_net):
    """The app on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(default_net, warmup=False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert _wait(lambda: server.started, 30)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


def test_page_in_headless_chromium(live_server, default_net, images, tmp_path):
    """Upload → top-5 shown (equal to net.top_k) → click the second class → explain with Grad-CAM →
    the map is shown over the image, and its colours are those of explainer.overlay."""
    chromium, driver_path, why = _browser_tools()
    if chromium is None:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    path = tmp_path / "chelsea.png"
    path.write_bytes(images["chelsea.png"])
    image = decoded(images["chelsea.png"])
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(live_server + "/")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, 'input[name="method"]'))
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#predictions tbody tr")) == 5)
        rows = browser.find_elements(By.CSS_SELECTOR, "#predictions tbody tr")
        shown = [(r.get_attribute("data-label"), int(r.get_attribute("data-index")), float(r.get_attribute("data-score")),
                  r.find_element(By.CSS_SELECTOR, "td.score").text) for r in rows]
        truth = default_net.top_k(image, 5)
        assert [(s[0], s[1], s[2]) for s in shown] == [(p.label, p.index, p.score) for p in truth]
        assert [s[3] for s in shown] == [f"{p.score:.4f}" for p in truth]
        rows[1].click()
        assert "selected" in rows[1].get_attribute("class")
        for box in browser.find_elements(By.CSS_SELECTOR, 'input[name="method"]'):
            if box.is_selected() != (box.get_attribute("value") == "gradcam"):
                box.click()
        browser.find_element(By.ID, "explain").click()
        panel = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '.panel[data-method="gradcam"][data-state="shown"]'))
        heat = panel.find_element(By.CSS_SELECTOR, "img.heatmap")
        assert browser.execute_script("return arguments[0].naturalWidth", heat) == image.shape[1]
        shown_png = heat.get_attribute("src").split(",", 1)[1]
        expected = explainer.overlay(image, explainer.gradcam(default_net, image, truth[1].index), alpha=1.0)
        np.testing.assert_array_equal(png_of(shown_png), expected)
        assert truth[1].label in panel.find_element(By.TAG_NAME, "h3").text
        slider = browser.find_element(By.ID, "opacity")
        browser.execute_script("arguments[0].value = 0.8; arguments[0].dispatchEvent(new Event('input'))", slider)
        assert float(heat.value_of_css_property("opacity")) == pytest.approx(0.8)
        assert not browser.find_element(By.ID, "error").is_displayed()
    finally:
        browser.quit()


def test_explain_classifies_once_per_request(client, default_net, images, monkeypatch):
    """The labels (top2) and their scores come from one forward pass, not one for each (#30)."""
    calls = []
    original = default_net.predict_model_input

    def counted(x, *args, **kwargs):
        calls.append(len(x))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(default_net, "predict_model_input", counted)
    response = client.post("/v1/explain", files=upload(images["chelsea.png"]),
                           data={"methods": "random", "labels": "top2"})
    assert response.status_code == 200, response.text
    truth = default_net.top_k(decoded(images["chelsea.png"]), 2)
    assert [l["index"] for l in response.json()["labels"]] == [p.index for p in truth]
    assert calls[:-1] == [1]  # the request's one pass (the last call is top_k's, just above)
