import numpy as np
import pytest

import explainer
from explainer.errors import DeviceError, InvalidParameterError
from explainer.runtime.providers import cuda_available

from graphs import linear_classifier


def test_auto_is_quiet_and_runs(capfd):
    model, _ = linear_classifier()
    net = explainer.load(model, preprocessing="none", device="auto")
    net.predict(np.zeros((8, 8, 3), np.uint8))
    err = capfd.readouterr().err
    assert "CUDAExecutionProvider" not in err and "Failed to load" not in err
    assert net.device == ("cuda" if cuda_available() else "cpu")
    assert net.ort.active_providers[-1] == "CPUExecutionProvider"


@pytest.mark.skipif(cuda_available(), reason="CUDA provider loads on this machine")
def test_cuda_requested_without_cuda_is_a_clear_error():
    model, _ = linear_classifier()
    with pytest.raises(DeviceError, match="device='cpu'"):
        explainer.load(model, device="cuda")


def test_cpu_forced_and_bad_device():
    model, _ = linear_classifier()
    assert explainer.load(model, device="cpu").ort.active_providers == ["CPUExecutionProvider"]
    with pytest.raises(InvalidParameterError, match="'auto', 'cpu', 'cuda'"):
        explainer.load(model, device="gpu")


def test_cuda_sessions_ask_for_float32_not_tf32(monkeypatch):
    """onnxruntime's CUDA provider rounds to TF32 by default; every session the library makes passes
    use_tf32=0 with the CUDA provider (what onnxruntime is asked, recorded here without a GPU)."""
    import onnxruntime as ort

    from explainer.runtime import providers

    seen = {}

    class Recorder:
        def __init__(self, data, options=None, providers=None, provider_options=None):
            seen["providers"], seen["options"] = providers, provider_options

    monkeypatch.setattr(ort, "InferenceSession", Recorder)
    providers.quiet_session(b"", providers.CUDA)
    assert seen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert seen["options"] == [{"use_tf32": "0"}, {}]
