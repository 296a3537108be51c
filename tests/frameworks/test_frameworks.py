"""The library on image classifiers exported by OTHER frameworks' own exporters (tf2onnx, Keras 3's
export, paddle2onnx, jax2onnx, torch.onnx on Hugging Face transformers), checked against the source
framework's own probabilities. Collected only when named (setup.cfg's norecursedirs keeps the main
run out of this folder):

    python tests/frameworks/build.py && python -m pytest tests/frameworks -rs
    python tests/frameworks/build.py --published && python -m pytest tests/frameworks -m published
    python tests/frameworks/build.py --extra && python -m pytest tests/frameworks -m extra

One test per case (tests/frameworks/cases.py); its sub-checks are those of check.py, all of which
must pass. A case whose files are missing fails, naming build.py.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import check  # noqa: E402


def _params():
    for name, case in cases.CASES.items():
        marks = [getattr(pytest.mark, case["optional"])] if case["optional"] else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_framework_export(name):
    try:
        results, facts = check.check(name)
    except check.MissingCase as exc:
        missing = str(exc)
    else:
        missing = None
    finally:
        gc.collect()
    if missing:
        pytest.fail(missing, pytrace=False)
    bad = check.failures(results)
    delta = facts.get("delta")
    summary = f"max |Δprob| vs the source framework: {delta if delta is not None else 'not measured'}"
    if "ort_delta" in facts:
        summary += f" (plain onnxruntime: {facts['ort_delta']:.2e})"
    assert not bad, (f"{len(bad)} of {len(results)} checks failed on {name} ({summary}; default layer "
                     f"{facts.get('layer')!r}):\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items()))
