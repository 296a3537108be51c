import atexit
import gc
import os
import shutil
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


@pytest.fixture(scope="session")
def default_net():
    import explainer

    return explainer.load()


@pytest.fixture(scope="session")
def googlenet_graph():
    """GoogLeNet's exact zoo graph (opset 9, LRN, Dropout, asymmetric AveragePool), seeded weights."""
    import explainer

    return explainer.load("seeded-inception_v1")


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
