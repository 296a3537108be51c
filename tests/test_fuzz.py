"""No model file can crash, hang or exhaust the process (issue #29).

* a seeded fuzz campaign (``tests/fuzz.py``): each mutant walked through the public API in a forked
  process under an address-space cap and a time limit; only results and the library's typed errors
  are accepted (a quick part here, a larger one marked fuzz: CI runs it after the main suite);
* the regression corpus ``tests/fuzz_corpus/`` (every mutant that ever failed) walked through the rest
  of the public API's model-facing calls;
* the checks themselves: zero extents refused before onnxruntime sees the graph, at the input's size
  and at any other size a run asks for; the run budget; allocation failures typed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import explainer
from explainer import limits
from explainer.errors import ExplainerError, InvalidParameterError, ResourceLimitError, UnsupportedModelError
from explainer.runtime import budget

import fuzz

CORPUS = Path(__file__).parent / "fuzz_corpus"


def _report(results) -> str:
    bad = [r for r in results if r.outcome not in fuzz.OK]
    lines = [f"{r.outcome}: {r.name}: {r.detail.splitlines()[0][:300] if r.detail else ''}" for r in bad]
    lines += [f"stacks of {r.name} before it was stopped:\n{r.detail.split(chr(10), 1)[1]}" for r in bad
              if r.outcome == "hang" and "\n" in r.detail][:2]  # what a hang was doing, for two of them
    return f"counts {fuzz.counts(results)}; failures:\n" + "\n".join(lines)


def _check(results):
    assert all(r.outcome in fuzz.OK for r in results), _report(results)


# --- the campaign -------------------------------------------------------------------------------------

def test_generator_is_seeded():
    a, b = fuzz.mutant(3, 17), fuzz.mutant(3, 17)
    assert a.data == b.data and a.kinds == b.kinds
    assert fuzz.mutant(3, 18).data != a.data


def test_generator_covers_every_mutation():
    kinds = {k for i in range(400) for k in fuzz.mutant(0, i).kinds}
    assert kinds == set(fuzz.MUTATORS)


def test_quick_campaign():
    """About 200 mutants of the four bases, two processes at a time: each a result or a typed error."""
    results = fuzz.campaign(seed=0, count=200, jobs=2)
    assert len(results) == 200
    _check(results)


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_slow_campaign(seed):
    results = fuzz.campaign(seed=seed, count=300, jobs=2)
    _check(results)


def test_corpus_walks_the_public_api():
    """Every file of the regression corpus, through every model-facing public call the walk makes:
    any exception that is not the library's fails the test, and so does a crash, hang or a run stopped
    by the memory cap."""
    files = sorted(CORPUS.glob("*.onnx"))
    assert files, "the regression corpus is missing"
    results = fuzz.run_many([(f.name, f.read_bytes()) for f in files], jobs=2, full=True)
    _check(results)


def test_corpus_files_are_small():
    assert all(f.stat().st_size < 64 << 10 for f in CORPUS.glob("*.onnx"))


def test_a_hang_reports_what_it_was_doing(monkeypatch):
    """A mutant stopped at the time limit is reported with the Python stacks its process dumped
    shortly before (a walk that waits 60 s here, stopped at 3 s)."""
    import time

    def stuck_in_a_walk(data, full):
        time.sleep(60)

    monkeypatch.setattr(fuzz, "walk", stuck_in_a_walk)  # the forked child calls the patched walk
    (out,) = fuzz.run_many([("stuck", b"")], jobs=1, time_limit=3.0)
    assert out.outcome == "hang"
    assert "stuck_in_a_walk" in out.detail and "stacks of stuck" in _report([out])


# --- zero extents -------------------------------------------------------------------------------------

def _zero_extent_graph(kind: str) -> onnx.ModelProto:
    """A classifier whose node ``kind`` meets a feature map of height 0 when the image is 3x1x9: 16
    channels, so that onnxruntime's blocked (NCHWc) kernels take it; run in plain onnxruntime at
    ORT_ENABLE_ALL, these graphs died with SIGFPE (onnxruntime 1.31)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="expand")]
    if kind in ("MaxPool", "AveragePool"):
        nodes.append(helper.make_node(kind, ["c"], ["z"], name="the_node", kernel_shape=[3, 3], strides=[2, 2]))
    elif kind == "InstanceNormalization":
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([2], np.int64), "axis"),
                  numpy_helper.from_array(np.ones(16, np.float32), "s"),
                  numpy_helper.from_array(np.zeros(16, np.float32), "b")]
        nodes += [helper.make_node("Slice", ["c", "zero", "zero", "axis"], ["empty"], name="slice"),
                  helper.make_node(kind, ["empty", "s", "b"], ["z"], name="the_node")]
    else:
        raise AssertionError(kind)
    nodes += [helper.make_node("GlobalMaxPool", ["z"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("MatMul", ["f", "fc_t"], ["logits"], name="fc")]
    inits[1] = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "fc_t")
    graph = helper.make_graph(nodes, "zero", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 1, 9])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("kind", budget.CRASHED_ONNXRUNTIME)
def test_node_kinds_that_crashed_onnxruntime_are_refused_before_it_runs(kind):
    """Every node kind seen to crash onnxruntime on a zero extent: refused at load, naming the node."""
    assert kind in budget.ZERO_EXTENT_OPS
    with pytest.raises(UnsupportedModelError, match=rf"'the_node' \({kind}\).*extent of zero"):
        explainer.load(_zero_extent_graph(kind), preprocessing="none")


def test_squeezenet_declared_3x7x224_is_refused():
    """The issue's crash (SIGFPE in onnxruntime): squeezenet with its image declared 3x7x224."""
    with pytest.raises(UnsupportedModelError, match=r"\(MaxPool\).*\[1, 128, 0, 27\]"):
        explainer.load(str(CORPUS / "squeezenet_3x7x224.onnx"), preprocessing="imagenet")


def test_zero_extent_checked_again_at_another_image_size():
    """The graph at its own size runs; a run at a size its pools reduce to 0 is refused by the guard
    before onnxruntime sees it (this one crashed it with SIGFPE)."""
    net = explainer.load(fuzz.base("squeeze"), preprocessing="none", batch_size=1)
    net.predict(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UnsupportedModelError, match=r"'pool2' \(MaxPool\).*\[1, 16, 0, 3\].*extent of zero"):
        net.ort.run(np.zeros((1, 3, 7, 32), np.float32), [net.output.name])


# --- the memory budget ------------------------------------------------------------------------------

def _expand_classifier(side: int) -> onnx.ModelProto:
    """The resnet base with an Expand making a (1, 8, side, side) float tensor per image."""
    return fuzz.m_huge_expand(fuzz.base("resnet"), _FixedSide(side))


class _FixedSide:
    """A stand-in for the generator's rng that always picks ``side``."""

    def __init__(self, side):
        self.side = side

    def integers(self, n, *args):
        return fuzz.SIDES.index(self.side) if self.side in fuzz.SIDES else 0


def test_a_declared_shape_that_contradicts_the_graph_does_not_hide_a_huge_tensor(monkeypatch):
    """A file's declared shapes are not trusted by the budget: the graph's output renamed to the first
    node's output (the mutation duplicate_output), declared (N, 6), was merged by inference, which then
    could not tell any later tensor, and the run that measures unknown sizes allocated what the graph
    asks for (seed 5's mutant 50: 29 GB). Now a Resize to 8192 x 8192 after the pool, whose size needs
    its input's shape, is refused at load with nothing run to measure."""
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 64 << 20)
    model = fuzz.m_huge_resize(fuzz.base("resnet"), _FixedSide(8192))
    model.graph.output[0].name = model.graph.node[0].output[0]
    measured = []
    monkeypatch.setattr(budget, "_measure", lambda *a: measured.append(a[-1]) or {})
    with pytest.raises(ResourceLimitError, match=r"node 'fz_resize' \(Resize\)"):
        explainer.load(model, preprocessing="none")
    assert measured == []  # nothing had to be run to find it


def test_single_image_over_the_budget_is_refused_at_load(monkeypatch):
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 64 << 20)
    model = _expand_classifier(8192)  # 8 channels x 8192 x 8192 floats: 2 GiB
    with pytest.raises(ResourceLimitError, match=r"node 'fz_expand' \(Expand\), 2,048.0 MiB"):
        explainer.load(model, preprocessing="none")


def test_batch_sizes_stay_under_the_budget(monkeypatch):
    model = _expand_classifier(512)  # 8 MiB per image
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 40 << 20)
    net = explainer.load(model, preprocessing="none", batch_size=16)
    per_image = net.ort.guard.estimate_for(net.per_image_shape).peak
    assert 8 << 20 <= per_image < 20 << 20
    allowed = (40 << 20) // per_image
    assert net.resolve_batch_size(16, "test") == allowed
    assert net.resolve_batch_size("auto", "test") <= allowed
    assert net.ort.best_batch_size(net._grey_input(), [net.output.name]) <= allowed
    probs = net.predict(np.zeros((5, 24, 24, 3), np.uint8))  # runs in batches the budget allows
    assert probs.shape == (5, 6)
    with pytest.raises(ResourceLimitError, match="use a smaller batch_size"):
        net.ort.run(np.zeros((allowed + 1, 3, 24, 24), np.float32), [net.output.name])


def test_torch_path_stays_under_the_budget(monkeypatch):
    model = _expand_classifier(64)  # 128 KiB per image
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 2 << 20)
    net = explainer.load(model, preprocessing="none", batch_size=16)
    estimate = net.ort.guard.estimate_for(net.per_image_shape)
    torch_batch = net.resolve_batch_size("auto", "test", backend="torch")
    assert torch_batch == max(1, (2 << 20) // estimate.total) < 64
    import torch

    from explainer.runtime.torch_engine import torch_engine

    engine = torch_engine(net)
    x = torch.zeros((64, 3, 24, 24), requires_grad=True)
    with pytest.raises(ResourceLimitError, match="torch module"), torch.enable_grad():
        engine.pixel_model.logits(x)


@pytest.mark.parametrize("method", ["smoothgrad", "integrated-gradients"])
def test_methods_batching_their_own_passes_stay_under_the_budget(monkeypatch, method):
    """SmoothGrad's noisy copies and integrated gradients' steps run 16 to a pass by default: lowered
    to what the budget allows, never refused, and the same attributions as one image per pass."""
    from explainer.methods.gradients import pixel_attributions
    from explainer.runtime.torch_engine import torch_engine

    model = _expand_classifier(64)
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 2 << 20)
    net = explainer.load(model, preprocessing="none", batch_size=16)
    engine = torch_engine(net)
    allowed = engine.largest_batch(16)
    assert 1 <= allowed < 16
    passes = []
    original = engine.pixel_model.logits
    monkeypatch.setattr(engine.pixel_model, "logits", lambda x: passes.append(len(x)) or original(x))
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.uint8)
    options = dict(samples=8, random_state=0) if method == "smoothgrad" else dict(steps=8)
    got = pixel_attributions(net, image, 0, method=method, **options)
    assert passes and max(passes) <= allowed
    one = pixel_attributions(net, image, 0, method=method, batch_size=1, **options)
    np.testing.assert_allclose(got, one, rtol=1e-4, atol=1e-6 * float(np.abs(one).max()))


def test_default_budget_is_a_fraction_of_available_memory(monkeypatch):
    """The default budget is RUN_BYTES_FRACTION of the available memory, read again once a reading is
    older than AVAILABLE_MEMORY_TTL (at least 256 MiB; MAX_RUN_BYTES, when set, instead)."""
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", None)
    monkeypatch.setattr(limits, "_reading", (float("-inf"), None))
    available = [10 << 30]
    monkeypatch.setattr(limits, "available_memory", lambda: available[0])
    monkeypatch.setattr(limits, "AVAILABLE_MEMORY_TTL", 1e9)
    assert limits.max_run_bytes() == int((10 << 30) * limits.RUN_BYTES_FRACTION)
    available[0] = 20 << 30
    assert limits.max_run_bytes() == int((10 << 30) * limits.RUN_BYTES_FRACTION)  # the reading still serves
    monkeypatch.setattr(limits, "AVAILABLE_MEMORY_TTL", 0.0)
    assert limits.max_run_bytes() == int((20 << 30) * limits.RUN_BYTES_FRACTION)  # read again
    available[0] = 100 << 20
    assert limits.max_run_bytes() == 256 << 20
    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 123456789)
    assert limits.max_run_bytes() == 123456789


def test_negative_dim_cannot_cancel_a_huge_constant_of_shape():
    m = fuzz.base("resnet")
    m = fuzz.m_negative_cancel(m, np.random.default_rng(0))
    with pytest.raises(ExplainerError, match="ConstantOfShape"):
        explainer.load(m, preprocessing="none")


def test_allocation_failures_are_typed():
    from explainer.runtime.ort_engine import ort_error

    for exc in (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : ... Failed to allocate memory for "
                             "requested buffer of size 536870912"),
                RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 536870912 bytes."),
                MemoryError()):
        error = ort_error(exc, (1, 3, 8, 8))
        assert isinstance(error, ResourceLimitError) and error.allocation_failed
    assert isinstance(ort_error(RuntimeError("Invalid input shape"), (1, 3, 8, 8)), UnsupportedModelError)


def test_torch_allocation_failure_is_typed():
    from explainer.runtime.torch_engine import torch_engine

    net = explainer.load(fuzz.base("resnet"), preprocessing="none", batch_size=1)
    engine = torch_engine(net)
    with pytest.raises(ResourceLimitError, match="torch could not allocate memory"):
        with engine.exclusive():
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 536870912 bytes.")


# --- raw errors the campaign found --------------------------------------------------------------------

@pytest.mark.parametrize("elem_type", [99, 1000, 0])
def test_unknown_input_element_type_is_typed(elem_type):
    m = fuzz.base("resnet")
    m.graph.input[0].type.tensor_type.elem_type = elem_type
    with pytest.raises(ExplainerError):
        explainer.load(m.SerializeToString())


@pytest.mark.parametrize("value", ["[1, 2]", "null", "42", '"imagenet"', "[]", '{"mean": {"a": 1}}', "{"])
def test_preprocessing_metadata_that_is_no_spec_is_typed(value):
    m = fuzz.base("resnet")
    m.metadata_props.append(onnx.StringStringEntryProto(key="onnx_explainer.preprocessing", value=value))
    with pytest.raises(InvalidParameterError, match="not a valid preprocessing spec"):
        explainer.load(m)


def test_labels_metadata_nested_thousands_deep_is_typed():
    m = fuzz.base("resnet")
    m.metadata_props.append(onnx.StringStringEntryProto(key="labels", value="[" * 5000))
    with pytest.raises(InvalidParameterError, match="not valid JSON"):
        explainer.load(m, preprocessing="none")


def test_weight_storing_another_number_of_bytes_than_its_dims_is_refused():
    m = fuzz.base("uint8_nhwc")
    std = next(t for t in m.graph.initializer if t.name == "std")
    std.data_type = TensorProto.FLOAT16  # 4 bytes stored, 2 declared
    with pytest.raises(ExplainerError, match="'std' declares dims"):
        explainer.load(m.SerializeToString())


def _in_fork(fn) -> str:
    """``fn()``'s result (a str) computed in a forked process; 'died: ...' where the process died."""
    import json

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            import torch

            torch.set_num_threads(1)
            out = json.dumps(fn()).encode()
            os.write(write, out)
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return f"died: {status}"
    return json.loads(b"".join(chunks))


def test_real_allocation_failure_in_onnxruntime_is_a_resource_limit_error():
    """With the budget raised out of the way, an Expand asking for 28 GiB under a 1 GiB address-space
    cap fails inside onnxruntime: a ResourceLimitError saying so, never a raw error."""
    import resource

    model = _expand_classifier(30000).SerializeToString()

    def attempt():
        limits.MAX_RUN_BYTES = 1 << 50
        cap = fuzz._vm_size() + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            explainer.load(model, preprocessing="none", batch_size=1)
        except Exception as exc:  # noqa: BLE001  (the test is which type)
            return f"{type(exc).__name__} {getattr(exc, 'allocation_failed', False)} {exc}"
        return "loaded"

    outcome = _in_fork(attempt)
    assert outcome.startswith("ResourceLimitError True"), outcome
    assert "could not allocate memory" in outcome
