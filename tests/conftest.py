import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# Tests build models into their own cache, never the user's, and remove it when they end.
if "ONNX_EXPLAINER_CACHE" not in os.environ:
    os.environ["ONNX_EXPLAINER_CACHE"] = tempfile.mkdtemp(prefix="onnx-explainer-test-cache-")
    atexit.register(shutil.rmtree, os.environ["ONNX_EXPLAINER_CACHE"], ignore_errors=True)


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
