import os
import tempfile

import numpy as np
import pytest

# Tests build models into their own cache, never the user's.
os.environ.setdefault("ONNX_EXPLAINER_CACHE", tempfile.mkdtemp(prefix="onnx-explainer-test-cache-"))


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
