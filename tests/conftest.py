import atexit
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pytest

import explainer  # noqa: F401  (first: it chooses OpenMP's wait policy before anything imports torch)

# Tests build models into their own cache, never the user's, and remove it when they end.
if "ONNX_EXPLAINER_CACHE" not in os.environ:
    os.environ["ONNX_EXPLAINER_CACHE"] = tempfile.mkdtemp(prefix="onnx-explainer-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ONNX_EXPLAINER_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _return_freed_memory():
    """After each test, freed memory goes back to the OS (glibc keeps it otherwise), so that the big
    models of later tests (VGG19: 575 MB of weights, held a few times while converting) do not stack
    on memory that is free but still counted in the suite's resident size. Only after tests that ran
    over a second: a collection costs about 0.4 s once the suite holds converted models, and quick
    tests allocate little (skipping them saved about 3 minutes of the suite)."""
    start = time.perf_counter()
    yield
    if time.perf_counter() - start > 1.0:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    from skimage import data

    return data.coffee()


@pytest.fixture
def auto_batch_model(monkeypatch, tmp_path):
    """A small linear classifier's graph (16x16 images; ``graphs.linear_classifier``) for measuring
    'auto' batch sizes: the measurements go to a fresh cache folder (``tmp_path``) and the engines run two
    parallel streams, so both sizes (single runs and streams) are measured on any machine."""
    from graphs import linear_classifier

    from explainer.runtime import ort_engine

    monkeypatch.setenv("ONNX_EXPLAINER_CACHE", str(tmp_path))
    monkeypatch.setattr(ort_engine.OrtEngine, "parallel_streams", lambda self: 2)
    model, _ = linear_classifier(size=(16, 16))
    return model


@pytest.fixture
def record_calls(monkeypatch):
    """``record_calls(owner, name, what)``: the method ``owner.name`` patched for the test so that each
    call appends ``what(*arguments)`` (the arguments after ``self``) to the list returned, then runs."""
    def record(owner, name, what):
        calls, real = [], getattr(owner, name)

        def recorded(self, *args, **kwargs):
            calls.append(what(*args, **kwargs))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)
        return calls

    return record


#: the session-scoped classifiers below by fixture name (loaded once for the whole suite; see
#: ``_shared_nets_give_back``)
_SHARED_NETS: dict = {}


@pytest.fixture(scope="session")
def default_net():
    import explainer

    net = _SHARED_NETS["default_net"] = explainer.load()
    return net


@pytest.fixture(scope="session")
def googlenet_graph():
    """GoogLeNet's exact zoo graph (opset 9, LRN, Dropout, asymmetric AveragePool), seeded weights."""
    import explainer

    net = _SHARED_NETS["googlenet_graph"] = explainer.load("seeded-inception_v1")
    return net


@pytest.fixture(scope="module", autouse=True)
def _shared_nets_give_back(request):
    """After each test file, the session-scoped classifiers its tests used let go of what those tests
    made them keep, as if loaded for that file alone (kept, they held it to the suite's end: every feature
    layer's in-graph Grad-CAM and Recipro-CAM session, and onnxruntime arenas grown to the largest batch
    any test ran; measured 0.6-1.1 GB after test_cams / test_layers): ``Classifier.release_caches`` drops
    the in-graph sessions and Recipro-CAM heads (made again on next use) and the classifier's sessions
    other than the plain one (activations, the single-threaded streams'), and returns the plain one's
    arena to the OS; the loaded graph and its converted torch module stay. Also the session
    tests/source_references.py keeps for its last file (test_compatibility's last case)."""
    yield
    references = sys.modules.get("source_references")  # its last file's onnxruntime session (lru_cache(1))
    if references is not None:
        references._session.cache_clear()
    used = set()  # the fixtures the file's tests request, by argument or as a parameter's name (getfixturevalue)
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            used.update(item.fixturenames)
            used.update(v for v in getattr(getattr(item, "callspec", None), "params", {}).values() if isinstance(v, str))
    nets = [net for name, net in _SHARED_NETS.items() if name in used]
    if not nets:
        return
    for net in nets:
        net.release_caches()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


if os.environ.get("RSS_LOG"):  # where the suite's peak memory grows: RSS_LOG=file python -m pytest
    import resource

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if after > before:
            with open(os.environ["RSS_LOG"], "a") as log:
                log.write(f"{after / 1024:.0f} MB peak (+{(after - before) / 1024:.0f}) {item.nodeid}\n")


# ---- skips: a test of the suite that skips fails the run, unless its reason is allowed here ------------
#: Skips that depend on the machine, not on what is installed: each a regular expression on the reason.
#: Anything else (a missing package, browser or service) fails the session, so CI cannot stay green while
#: part of the suite silently did not run. EXPLAINER_ALLOW_SKIPS=1 accepts every skip (a local run without
#: chromium, say); the skips are still listed (-rs).
ALLOWED_SKIPS = (
    r"^CUDA provider loads on this machine$",  # test_providers: the no-CUDA error, on a machine with CUDA
    r"^needs CUDA",  # checks that only mean something on a GPU (TF32 off in the torch and ORT paths)
)
_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped (importorskip)
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def unexpected_skips(skips=None) -> list[tuple[str, str]]:
    import re

    return [(node, reason) for node, reason in (_SKIPS if skips is None else skips)
            if not any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS)]


def pytest_sessionfinish(session, exitstatus):
    bad = unexpected_skips()
    if bad and os.environ.get("EXPLAINER_ALLOW_SKIPS") != "1" and exitstatus == 0:
        session.exitstatus = 1
        session.config._explainer_bad_skips = bad


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = getattr(config, "_explainer_bad_skips", None)
    if bad:
        terminalreporter.section("skips that fail the run", sep="=", red=True, bold=True)
        for node, reason in bad:
            terminalreporter.line(f"{node}: {reason}", red=True)
        terminalreporter.line("Install what they name (CI: bash .ci/run installs chromium), allow the reason in "
                              "tests/conftest.py's ALLOWED_SKIPS if it depends on the machine, or run with "
                              "EXPLAINER_ALLOW_SKIPS=1 to accept them locally.")
