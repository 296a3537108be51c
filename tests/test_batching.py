"""Graphs exported for batch 1 run any batch size; 'auto' batch size is measured once and cached."""
import json

import numpy as np
import onnxruntime as ort
import pytest

import explainer
from explainer.runtime import ort_engine
from explainer.zoo.seeded import ARCHITECTURES, seeded_model
from graphs import seeded_set


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(n)]


def test_googlenet_fixed_batch_reshape_runs_batches(googlenet_graph):
    net = googlenet_graph
    assert net.input.fixed_batch == 1
    assert any(line.startswith("free-batch") for line in net.normalisation_log)
    images = _images(3)
    batched = net.predict(images)
    single = np.stack([net.predict(im) for im in images])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-7)
    # and equal to the untouched original graph run by onnxruntime, one image at a time
    original = ort.InferenceSession(seeded_model("inception_v1").SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    pixels, _ = net.prepare(images)
    x = net.to_model_input(pixels)
    direct = np.concatenate([original.run(None, {"data_0": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", seeded_set(set(ARCHITECTURES) - {"inception_v1"}))
def test_compat_set_batches_equal_single(arch):
    net = explainer.load(f"seeded-{arch}", batch_size=2)
    images = _images(3, seed=1)
    np.testing.assert_allclose(net.predict(images), np.stack([net.predict(i) for i in images]),
                               rtol=1e-4, atol=1e-6)


def test_auto_batch_size_measured_once_and_cached(auto_batch_model, record_calls, tmp_path):
    """'auto' is measured once per model for single runs and once for the parallel streams of the
    perturbation methods (each stream running its own batches), then read from the cache."""
    model = auto_batch_model
    net = explainer.load(model, preprocessing="none")
    calls = record_calls(ort_engine.OrtEngine, "_throughput", lambda b, o, streams: (len(b), streams))
    chosen = net.batch_size
    assert chosen in ort_engine.BATCH_CANDIDATES and len(calls) >= 3 and {s for _, s in calls} == {1}
    calls.clear()
    on_streams = net.resolve_batch_size("auto", "occlusion_sensitivity", "onnxruntime")
    assert on_streams in ort_engine.BATCH_CANDIDATES and len(calls) >= 3 and {s for _, s in calls} == {2}
    assert net.resolve_batch_size("auto", "occlusion_sensitivity", "torch") == chosen
    assert net.resolve_batch_size(5, "occlusion_sensitivity", "onnxruntime") == 5
    again = explainer.load(model, preprocessing="none")
    calls.clear()
    assert again.batch_size == chosen and again.stream_batch_size == on_streams
    assert calls == []  # both read from the cache, nothing measured
    assert len(json.loads((tmp_path / "batch_sizes.json").read_text())) == 2
    fixed = explainer.load(model, preprocessing="none", batch_size=3)
    assert fixed.batch_size == fixed.stream_batch_size == 3 and calls == []


@pytest.mark.parametrize("streams", [2, 3])
def test_parallel_streams_yield_in_order_with_bounded_memory_and_stop_early(monkeypatch, streams):
    """Batches forwarded in parallel single-threaded streams give the numpy reference's
    probabilities in order; at most two batches per stream are ever made ahead; stopping early
    cancels the batches not started."""
    import threading

    from graphs import linear_classifier

    from explainer.runtime.perturb import stream_probabilities

    model, reference = linear_classifier(size=(16, 16))
    net = explainer.load(model, preprocessing="none")
    monkeypatch.setattr(net.ort, "parallel_streams", lambda: streams)
    rng = np.random.default_rng(0)
    x = rng.random((50, 3, 16, 16)).astype(np.float32)
    made, lock, ahead = [], threading.Lock(), []
    yielded = [0]

    def make_batch(a, b):
        with lock:
            made.append(a)
            ahead.append(len(made) - yielded[0])
        return x[a:b]

    logits = reference(x)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    got = np.empty_like(expected)
    order = []
    for a, b, p in stream_probabilities(net, make_batch, 50, batch_size=4, verbose=False):
        got[a:b] = p
        order.append(a)
        yielded[0] += 1
    assert order == list(range(0, 50, 4))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert max(ahead) <= 2 * streams + 1
    assert ((), True) in net.ort._sessions  # the single-threaded session ran

    made.clear()
    yielded[0] = 0
    for a, b, p in stream_probabilities(net, make_batch, 400, batch_size=4, verbose=False):
        break
    assert len(made) <= 2 * streams + 1  # the rest of the 100 batches was never made


def test_parallel_streams_share_the_run_budget(monkeypatch):
    """The run budget holds every run in flight at once: two streams of batch 4 run only where eight
    images fit the budget; where four fit, one stream runs (the fuzz campaign's huge Pad ran two
    streams of a batch the budget held once, and onnxruntime failed to allocate)."""
    from graphs import linear_classifier

    from explainer import limits
    from explainer.runtime.perturb import stream_probabilities

    model, _ = linear_classifier(size=(16, 16))
    net = explainer.load(model, preprocessing="none")
    monkeypatch.setattr(net.ort, "parallel_streams", lambda: 2)
    peak = net.ort.guard.estimate_for(net.per_image_shape).peak
    x = np.random.default_rng(0).random((16, 3, 16, 16)).astype(np.float32)
    modes = []

    def forward(single_thread):  # the parallel path asks for single-threaded runs
        modes.append(single_thread)
        return lambda batch: np.zeros((len(batch), 1), np.float32)

    for budget, parallel in [(8 * peak, True), (8 * peak - 1, False), (4 * peak, False)]:
        monkeypatch.setattr(limits, "MAX_RUN_BYTES", budget)
        modes.clear()
        list(stream_probabilities(net, lambda a, b: x[a:b], 16, batch_size=4, verbose=False, forward=forward))
        assert modes == [parallel], (budget / peak, modes)


def test_runs_in_flight_wait_for_room_in_the_budget(monkeypatch):
    """budget.InFlight: a run that would take the bytes in flight over the budget waits until the run
    holding them ends; a run alone never waits; a run inside a run of the same thread does not wait
    for itself."""
    import threading

    from explainer import limits
    from explainer.runtime.budget import InFlight

    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 100)
    flight = InFlight()
    entered, release = threading.Event(), threading.Event()
    order = []

    def first():
        with flight.hold(60):
            order.append("first in")
            with flight.hold(60):  # nested: 120 held, no wait
                order.append("nested")
            entered.set()
            release.wait(10)
            order.append("first out")

    def second():
        entered.wait(10)
        with flight.hold(60):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    entered.wait(10)
    threads[1].join(0.5)  # the second may not enter while the first holds 60 of 100
    assert "second in" not in order and threads[1].is_alive()
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["first in", "nested", "first out", "second in"]
    assert flight.bytes == 0 and flight.peak == 120
    with flight.hold(500):  # alone and over the budget (a refused size never gets here): no wait
        assert flight.bytes == 500


def test_runs_in_flight_wait_in_the_order_they_asked(monkeypatch):
    """budget.InFlight: a run that waits for room is not passed by a smaller one that asks after it and
    would fit beside the runs in flight (a large run would starve while small ones keep fitting): with
    60 of 100 held, a run of 80 waits, and a run of 30 asked after it waits behind it; when the 60 end
    the 80 runs, then the 30."""
    import threading
    import time

    from explainer import limits
    from explainer.runtime.budget import InFlight

    monkeypatch.setattr(limits, "MAX_RUN_BYTES", 100)
    flight = InFlight()
    held, release = threading.Event(), {name: threading.Event() for name in ("a", "b", "c")}
    order = []

    def run(name, need):
        with flight.hold(need):
            order.append(f"{name} in")
            held.set()
            release[name].wait(10)
            order.append(f"{name} out")

    def waiting(n):  # until n runs wait (at most 10 s)
        for _ in range(1000):
            if len(flight._waiting) == n:
                return True
            time.sleep(0.01)
        return False

    a = threading.Thread(target=run, args=("a", 60))
    a.start()
    assert held.wait(10)
    b = threading.Thread(target=run, args=("b", 80))
    b.start()
    assert waiting(1)
    c = threading.Thread(target=run, args=("c", 30))
    c.start()
    assert waiting(2)  # 60 + 30 would fit, but the 80 asked first
    assert order == ["a in"]
    for name in ("a", "b", "c"):
        release[name].set()
    for t in (a, b, c):
        t.join(10)
    assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]
    assert flight.bytes == 0 and not flight._waiting


def test_two_callers_streams_share_the_budget(monkeypatch):
    """Two threads each running the batching loop (as the service's workers do), with a budget that
    holds one batch: never two batches in onnxruntime at once; with room for four, they overlap."""
    import threading

    from graphs import linear_classifier

    from explainer import limits
    from explainer.runtime.perturb import stream_probabilities

    model, _ = linear_classifier(size=(16, 16))
    net = explainer.load(model, preprocessing="none")
    monkeypatch.setattr(net.ort, "parallel_streams", lambda: 2)
    peak = net.ort.guard.estimate_for(net.per_image_shape).peak
    x = np.random.default_rng(0).random((32, 3, 16, 16)).astype(np.float32)
    lock, now, most = threading.Lock(), [0], [0]
    waits = {False: 1.0, True: 30.0}  # serialised: the wait times out (once); overlapping: a partner comes

    def forward(single_thread):
        def run(batch):
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            try:
                try:  # wait for another run to be in flight too (none comes when serialised)
                    both_in.wait()
                except threading.BrokenBarrierError:
                    pass
                return np.zeros((len(batch), 1), np.float32)
            finally:
                with lock:
                    now[0] -= 1
        return run

    def caller():
        list(stream_probabilities(net, lambda a, b: x[a:b], 32, batch_size=4, verbose=False, forward=forward))

    for budget, overlap_wanted, most_allowed in [(4 * peak, False, 1), (16 * peak, True, 4)]:
        monkeypatch.setattr(limits, "MAX_RUN_BYTES", budget)
        now[0] = most[0] = 0
        both_in = threading.Barrier(2, timeout=waits[overlap_wanted])
        threads = [threading.Thread(target=caller) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert most[0] <= most_allowed, (budget / peak, most[0])
        if overlap_wanted:
            assert most[0] >= 2  # room for several: the runs did overlap


def test_a_torch_turn_is_counted_among_the_runs_in_flight():
    """The torch engine's turn on its module counts its largest pass in budget.IN_FLIGHT (every
    intermediate where the pass keeps its graph for backward) until the turn ends: an onnxruntime run
    of another thread then waits for room in the budget."""
    import torch
    from graphs import linear_classifier

    from explainer.runtime.budget import IN_FLIGHT
    from explainer.runtime.torch_engine import torch_engine

    model, _ = linear_classifier(size=(16, 16))
    net = explainer.load(model, preprocessing="none")
    engine = torch_engine(net)
    x = torch.rand(2, 3, 16, 16) * 255
    est = net.ort.guard.estimate_for(net.per_image_shape)
    before = IN_FLIGHT.bytes
    with engine.exclusive(), torch.enable_grad():
        engine.pixel_model(x)
        assert IN_FLIGHT.bytes - before == 2 * est.total
        with engine.exclusive():  # re-entered: the same turn
            engine.pixel_model(x[:1])  # a smaller pass adds nothing
            assert IN_FLIGHT.bytes - before == 2 * est.total
    assert IN_FLIGHT.bytes == before
    with engine.exclusive(), torch.no_grad():
        engine.pixel_model(x)
        assert IN_FLIGHT.bytes - before == 2 * est.peak  # nothing kept for a backward pass
    assert IN_FLIGHT.bytes == before
    engine.pixel_model(x)  # outside a turn: not counted
    assert IN_FLIGHT.bytes == before


class _RowRNN(__import__("torch").nn.Module):
    """Sequencer's pattern: a feature map's rows as sequences through a bidirectional recurrent layer,
    the batch merged with the rows (sequence axis first, as torch's default)."""

    def __init__(self, kind: str):
        import torch

        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 4, 4)
        self.rnn = getattr(torch.nn, kind)(8, 6, bidirectional=True)
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        f = self.conv(x)
        b, c, h, w = f.shape
        y, _ = self.rnn(f.permute(0, 2, 3, 1).reshape(b * h, w, c).transpose(0, 1))
        return self.fc(y.transpose(0, 1).reshape(b, h, w, 12).mean((1, 2)))


@pytest.mark.parametrize("kind,exporter", [("LSTM", "legacy"), ("GRU", "legacy"), ("RNN", "legacy"),
                                           ("LSTM", "dynamo"), ("RNN", "dynamo")])
def test_recurrent_layers_exported_at_batch_1_run_batches(kind, exporter, tmp_path):
    """LSTM / GRU / RNN nodes carry the batch (Y on axis 2, the final states on axis 1) and their initial
    states scale with it: the legacy exporter's Expand of zeros of the exported rows to a target computed
    from the sequence, the dynamo exporter's constant zeros; the dynamo exporter unrolls an RNN, folding
    ``zeros(rows, H) @ W + b`` into a constant of the exported rows, all equal, added to the sequence.
    Batches equal torch's module, and the gradient methods' module equals onnxruntime."""
    import warnings

    import torch

    from explainer.runtime.torch_engine import torch_engine

    model, path = _RowRNN(kind).eval(), tmp_path / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=exporter == "dynamo",
                          opset_version=17 if exporter == "legacy" else 18, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", explainer.errors.BatchFallbackWarning)
        net = explainer.load(str(path), preprocessing="none", batch_size=3)
    assert net.max_batch is None
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(net.to_model_input(images.astype(np.float32)))).numpy()
    np.testing.assert_allclose(net.logits(images), expected, rtol=1e-4, atol=1e-5)
    assert torch_engine(net).max_relative_error <= 1e-5
