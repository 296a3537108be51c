"""Registry downloads, tested against a loopback HTTP server (never the internet)."""
import hashlib
import http.server
import threading

import pytest

from explainer.errors import DownloadError
from explainer.zoo import registry
from explainer.zoo.registry import ModelEntry

from graphs import linear_classifier


@pytest.fixture
def server():
    payload = linear_classifier()[0].SerializeToString()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = payload if self.path == "/model.onnx" else b"x" * 10
            if self.path == "/missing":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload, hits
    httpd.shutdown()


def test_download_once_with_checksum(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    url, payload, hits = server
    entry = ModelEntry("tiny", "test", url=url + "/model.onnx",
                       sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    monkeypatch.setitem(registry.REGISTRY, "tiny", entry)
    import explainer

    net = explainer.load("tiny", preprocessing="none")
    assert net.num_classes == 4 and (tmp_path / "tiny.onnx").read_bytes() == payload
    explainer.load("tiny", preprocessing="none")
    assert hits == ["/model.onnx"]  # the second load used the verified cached file


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, payload, _ = server
    entry = ModelEntry("bad", "test", url=url + "/other", sha256="0" * 64)
    with pytest.raises(DownloadError, match="checksum mismatch.*Download it yourself"):
        from explainer.zoo.download import download

        download(entry.url, tmp_path / "bad.onnx", entry.sha256, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_size_limit(server, tmp_path):
    from explainer.zoo.download import download

    url, payload, _ = server
    with pytest.raises(DownloadError, match="404"):
        download(url + "/missing", tmp_path / "m.onnx", "0" * 64, verbose=False)
    with pytest.raises(DownloadError, match="more than the expected 5 bytes"):
        download(url + "/other", tmp_path / "m.onnx", "0" * 64, size=5, verbose=False)
    assert list(tmp_path.iterdir()) == []
