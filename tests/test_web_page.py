"""The exported model's page (explainer/web/): a file written by ``explainer export`` run in headless
chromium by onnxruntime-web's wasm backend (installed from npm into a temporary folder), fed a known
image; what the page read from the model's metadata, its preprocessed input, top class, probability and
saliency map equal the library's preprocessing and onnxruntime's run in Python of the same file."""
import base64
import functools
import io
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

import explainer

pytestmark = pytest.mark.slow

PAGE = Path(explainer.__file__).parent / "web"
#: the onnxruntime-web release the page is tested with (npm's cache keeps reinstalls offline and quick)
ORT_WEB = "onnxruntime-web@1.31.1"


def _tools():
    import importlib.util

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if importlib.util.find_spec("selenium") is None:
        return None, "selenium is not installed (pip install -e '.[dev]')"
    if chromium is None or driver is None:
        return None, "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
    if shutil.which("npm") is None:
        # allowed in tests/conftest.py's ALLOWED_SKIPS: .ci/run installs chromium, not Node.js
        return None, "npm is not installed: the page's test installs onnxruntime-web with it"
    return (chromium, driver), ""


@pytest.fixture(scope="module")
def ort_web(tmp_path_factory) -> Path:
    """onnxruntime-web's dist/ folder, installed with npm into a temporary folder."""
    tools, why = _tools()
    if tools is None:
        pytest.skip(why)
    prefix = tmp_path_factory.mktemp("npm")
    run = subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--ignore-scripts",
                          "--prefix", str(prefix), ORT_WEB], capture_output=True, text=True, timeout=600)
    dist = prefix / "node_modules" / "onnxruntime-web" / "dist"
    if run.returncode != 0 or not (dist / "ort.min.js").is_file():
        pytest.skip(f"npm install {ORT_WEB} failed (no registry?): {(run.stderr or run.stdout)[-500:]}")
    return dist


class _Quiet(http.server.SimpleHTTPRequestHandler):  # python -m http.server's handler, as the README serves it
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory, ort_web, default_net):
    """A loopback server of the page as a user lays it out: the page's two files, onnxruntime-web's
    dist/ at node_modules/onnxruntime-web/dist/ beside them (the page's default), the exported model."""
    root = tmp_path_factory.mktemp("site")
    for name in ("index.html", "explained.js"):
        shutil.copy(PAGE / name, root / name)
    (root / "node_modules" / "onnxruntime-web").mkdir(parents=True)
    os.symlink(ort_web, root / "node_modules" / "onnxruntime-web" / "dist")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join(30)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    (chromium, driver), _ = _tools()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--force-color-profile=srgb", "--window-size=1200,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.parametrize("method, top_k", [("gradcam", 1), ("recipro_cam", 0)])
def test_page_computes_the_exported_maps_with_onnxruntime_web(site, default_net, chelsea, tmp_path, method, top_k):
    """chelsea (451 x 300, resized by the page as the library resizes) → the page's input tensor is the
    library's; its top class, probability and map (7 x 7) are onnxruntime's in Python on that tensor (map
    within 1e-4 of its range); the overlay is explainer.overlay's. With --top-k 0 (an int64 input
    ``target``) the page asks for the top class; that model is chosen in the page's file input, after a
    plain model it refuses."""
    import onnx
    import onnxruntime as ort
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, root = site
    name = f"lite0_{method}_top{top_k}.onnx"
    model = Path(explainer.export_explained(default_net, root / name, method=method, top_k=top_k))
    image = tmp_path / "chelsea.png"
    Image.fromarray(chelsea).save(image)
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 120)
        if top_k:  # a served model (?model=URL), else the model's file input
            browser.get(f"{url}/index.html?model={name}")
        else:
            browser.get(f"{url}/")
            wait.until(lambda b: b.execute_script("return window.explained.state") != "loading")
            plain = root / "plain.onnx"  # not exported: one error naming explainer export
            onnx.save(default_net.model, plain)
            browser.find_element(By.ID, "model").send_keys(str(plain))
            wait.until(lambda b: b.execute_script("return window.explained.state") == "error")
            assert "explainer export" in browser.find_element(By.ID, "error").text
            assert not browser.find_element(By.ID, "image").is_enabled()
            browser.find_element(By.ID, "model").send_keys(str(model))
        wait.until(lambda b: b.execute_script("return window.explained && (window.explained.model !== null "
                                              "|| window.explained.state === 'error')"))
        assert browser.execute_script("return window.explained.error") is None
        described = browser.execute_script("return window.explained.model")
        browser.find_element(By.ID, "image").send_keys(str(image))
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert browser.execute_script("return window.explained.error") is None
        result = browser.execute_script("return window.explained.result")
        drawn = browser.execute_script("return document.getElementById('overlay').toDataURL('image/png')")
        top_text = browser.find_element(By.ID, "top").text
        body_top = browser.find_element(By.TAG_NAME, "body").get_attribute("data-top-class")
    finally:
        browser.quit()

    # what the page read from the model's metadata_props and input
    assert described["method"] == method and described["hasTarget"] == (top_k == 0) and described["layout"] == "NCHW" and described["dtype"] == "float32"
    assert (described["height"], described["width"], described["channels"]) == (224, 224, 3)
    assert described["labels"] == list(default_net.class_names)
    p = default_net.preprocessing
    assert described["preprocessing"] == {"mean": list(p.mean), "std": list(p.std), "scale": p.scale,
                                          "channelOrder": p.channel_order}

    # its preprocessing is the library's (Pillow's bicubic reimplemented in JS)
    x = np.asarray(result["input"]["data"], np.float32).reshape(result["input"]["dims"])
    expected = default_net.to_model_input(default_net.prepare(chelsea)[0])
    assert x.shape == expected.shape
    gap = float(np.abs(x - expected).max())
    print(f"\n{method}: page's input vs the library's: max |diff| {gap:.3g}")
    assert gap <= 1e-4 * (expected.max() - expected.min())

    # its run is onnxruntime's in Python, on the same file and the same input
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: x}
    if top_k == 0:
        logits = session.run(["logits"], {**feeds, "target": np.zeros(1, np.int64)})[0]  # its class: any
        feeds["target"] = np.argmax(logits, axis=1)
    logits, saliency, *rest = session.run(None, feeds)
    classes = rest[0] if rest else feeds["target"][:, None]
    page_map = np.asarray(result["saliency"]["data"], np.float32).reshape(result["saliency"]["dims"])
    assert page_map.shape == saliency.shape == (1, 1, 7, 7)
    span = float(saliency.max() - saliency.min())
    diff = float(np.abs(page_map - saliency).max())
    print(f"{method}: page vs onnxruntime: map max |diff| {diff:.3g} = {diff / span:.3g} of its range")
    assert diff <= 1e-4 * span
    assert result["topClass"] == int(classes[0, 0]) == int(np.argmax(logits[0])) == int(body_top)
    probability = np.exp(logits[0] - logits[0].max()) / np.exp(logits[0] - logits[0].max()).sum()
    assert result["probability"] == pytest.approx(float(probability[classes[0, 0]]), abs=1e-5)
    assert result["label"] == default_net.class_names[classes[0, 0]] and result["label"] in top_text
    assert default_net.top_k(chelsea, 1)[0].index == result["topClass"]

    # the overlay is explainer.overlay's drawing of that map (bicubic resize, jet from its minimum to its maximum)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(drawn.split(",", 1)[1]))).convert("RGB"))
    reference = explainer.overlay(chelsea, page_map[0, 0], alpha=0.5)
    levels = np.abs(shown.astype(int) - reference.astype(int))
    print(f"{method}: overlay vs explainer.overlay: max {levels.max()} levels, {np.mean(levels > 1):.2%} of values over 1")
    assert shown.shape == reference.shape and levels.max() <= 2 and np.mean(levels > 1) < 1e-3
