"""Registry downloads, tested against a loopback HTTP server (never the internet)."""
import hashlib
import http.server
import threading

import numpy as np
import pytest

from explainer.errors import DownloadError
from explainer.zoo import registry
from explainer.zoo.registry import ModelEntry

from graphs import linear_classifier


BIG = b"w" * 200_000  # over the 64 KiB file-size limit of the full-disk tests


@pytest.fixture
def server():
    payload = linear_classifier()[0].SerializeToString()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = {"/model.onnx": payload, "/big": BIG}.get(self.path, b"x" * 10)
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


def test_seeded_models_are_made_in_memory_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    import explainer

    entry = registry.REGISTRY["seeded-squeezenet"]
    first = explainer.load("seeded-squeezenet")
    assert first.name == "seeded-squeezenet"
    # no model written (VGG19's would be 575 MB of disk per cache); only the settings measured at load
    # (optimisations.json: onnxruntime's graph optimisations checked once per model)
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".json" or p.stat().st_size > 65536] == []
    assert entry.make().SerializeToString() == entry.make().SerializeToString()  # the seed fixes them
    with pytest.raises(ValueError, match="built in memory"):
        entry.fetch()


# A real write failure: the child process may not write files over 64 KiB (RLIMIT_FSIZE), so the
# kernel answers EFBIG as it would ENOSPC on a full disk.
_LIMITED_WRITE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
from explainer.errors import CacheError
try:
    {call}
except CacheError as exc:
    print("CacheError:", exc)
"""


def _limited(call: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _LIMITED_WRITE.format(call=call)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_full_disk_is_one_cache_error_naming_the_fix_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    out = _limited(f"from explainer.cache import atomic_write; atomic_write({str(target)!r}, b'x' * 200000)")
    assert out.startswith("CacheError: cannot write") and "ONNX_EXPLAINER_CACHE" in out
    assert "File too large" in out
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_full_disk_during_download_is_a_cache_error_and_leaves_nothing(server, tmp_path):
    url = server[0] + "/big"
    out = _limited("from explainer.zoo.download import download; download("
                   f"{url!r}, {str(tmp_path / 'big.onnx')!r}, {hashlib.sha256(BIG).hexdigest()!r}, verbose=False)")
    assert out.startswith("CacheError: cannot write") and "ONNX_EXPLAINER_CACHE" in out
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_folder_costs_a_remeasured_batch_size_not_the_result(tmp_path, monkeypatch):
    from explainer.cache import update_json
    from explainer.errors import CacheError
    from explainer.runtime.ort_engine import BATCH_CANDIDATES, OrtEngine

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(blocker / "cache"))  # under a file: mkdir fails
    with pytest.raises(CacheError, match="ONNX_EXPLAINER_CACHE"):
        update_json("batch_sizes.json", "k", 1)
    model, _ = linear_classifier()
    engine = OrtEngine(model, "image", ["CPUExecutionProvider"], "tiny")
    with pytest.warns(UserWarning, match="not remembered"):
        size = engine.best_batch_size(np.zeros((3, 8, 8), np.float32), engine.default_outputs)
    assert size in BATCH_CANDIDATES
